"""native.py: where the kernels are built."""

from lowmem_paligemma.formats import native


def test_each_checkout_builds_into_its_own_directory(tmp_path, monkeypatch):
    # torch's build files name the source by path: two checkouts sharing a directory would rebuild on every switch.
    here = native.cache_dir()
    copy = tmp_path / "native.cpp"
    copy.write_bytes(native.SOURCE.read_bytes())
    monkeypatch.setattr(native, "SOURCE", copy)
    assert native.cache_dir() != here
    assert native.cache_dir() == native.cache_dir()  # and stable for one checkout
