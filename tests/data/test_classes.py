"""Class names for tables and figures: named where the data set names its classes, the bare
label elsewhere."""

from fastunlearn.data.classes import class_names, describe


def test_fashion_mnist_and_retina_name_their_classes():
    names = class_names("fashion-mnist")
    assert len(names) == 10 and names[0] == "T-shirt/top" and names[9] == "Ankle boot"
    assert describe("fashion-mnist", 3) == "3 (Dress)"
    assert describe("FASHION-MNIST", 0) == "0 (T-shirt/top)"
    assert len(class_names("retinamnist")) == 5
    assert describe("retinamnist", 0) == "0 (grade 0 (no DR))"


def test_unnamed_data_sets_and_out_of_range_labels_give_the_bare_label():
    assert class_names("digits") is None and class_names(None) is None
    assert describe("digits", 3) == "3"
    assert describe(None, 7) == "7"
    assert describe("fashion-mnist", 10) == "10" and describe("fashion-mnist", -1) == "-1"
