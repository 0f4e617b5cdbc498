import pytest

from salience_detr.utils.atomic import atomic_write


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "model.pth"
    atomic_write(str(path), lambda f: f.write(b"old"))

    def crash(file):
        file.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), crash)
    assert path.read_bytes() == b"old"
    assert [p.name for p in path.parent.iterdir()] == ["model.pth"]
