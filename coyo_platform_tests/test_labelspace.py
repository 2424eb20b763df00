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
