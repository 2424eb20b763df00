"""The card's label space: 21,841 fall11 classes selected from the model's 21,843 outputs."""

from coyo_platform.common import labelspace


def test_card_example_indices_name_the_card_classes():
    # the card's example row (a pair of table lamps): its top labels, in fall11 ordering
    names = labelspace.class_names()
    assert len(names) == 21_841
    assert names[11054] == "table lamp"
    assert names[10576] == "source of illumination"
    assert names[9710] == "reading lamp"
    assert names[8087] == "lamp"


def test_mapping_drops_the_two_google_only_outputs():
    index = labelspace.goog_to_fall11()
    assert index.shape == (21_841,)
    assert len(set(index.tolist())) == 21_841
    assert set(range(21_843)) - set(index.tolist()) == {9205, 15027}


def test_mapping_agrees_with_timm_class_info():
    from timm.data import ImageNetInfo

    fall11, goog = ImageNetInfo("imagenet-22k"), ImageNetInfo("imagenet-21k-goog")
    index = labelspace.goog_to_fall11()
    for i in (0, 8087, 11054, 21_840):
        assert fall11.index_to_label_name(i) == goog.index_to_label_name(int(index[i]))


def test_class_names_come_without_importing_torch():
    """The stats assets name classes in processes that never label: reading timm's label files
    must not import timm (which imports torch: an 877 MB peak), and gives timm's own names."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from coyo_platform.common import labelspace\n"
        "names = labelspace.class_names()\n"
        "print(len(names), names[11054], 'timm' in sys.modules, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["21841", "table", "lamp", "False", "False"]

    from timm.data import ImageNetInfo

    timm_names = ImageNetInfo("imagenet-22k")
    for i in (0, 8087, 11054, 21_840):
        assert labelspace.class_names()[i] == timm_names.index_to_description(i).split(",")[0]
