"""Evaluation: metrics, reports, plots, baselines, parameter sweeps and the authors' reference loop."""
