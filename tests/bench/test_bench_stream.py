"""bench_stream writes its folder, reads it back as written and reports every figure."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))


def test_bench_stream_runs_and_its_folder_holds_the_images(tmp_path):
    import bench_stream

    from fastunlearn.data.image_folder import load_image_folder

    rows = bench_stream.main(["--n", "40", "--size", "32", "--root", str(tmp_path), "--workers", "1", "--reps", "1",
                              "--tensor-subset", "40", "--no-csv", "--device", "cpu"])
    ds = load_image_folder(tmp_path)
    assert len(ds) == 40 and ds[3][0].shape == (3, 32, 32) and ds.targets[:6].tolist() == [0, 1, 2, 3, 4, 0]
    assert ds.metadata[1]["site"] == "B"
    (row,) = rows
    for key in ("decode_ips", "search_ips", "finetune_ips", "job_ips", "tensor_job_ips", "rss_mib"):
        assert row[key] > 0, key
    assert row["bound"] in ("loader", "compute")
    # The second call finds the folder written and leaves it as it is.
    before = os.path.getmtime(tmp_path / "labels.csv")
    bench_stream.generate(str(tmp_path), 40, 32)
    assert os.path.getmtime(tmp_path / "labels.csv") == before
    assert torch.equal(ds[0][0], load_image_folder(tmp_path)[0][0])
