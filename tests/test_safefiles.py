"""Atomic writes: the file appears whole or not at all, with the permissions a plain open() would give."""

import os
import stat

import pytest

from sdlora.safefiles import atomic_write_bytes


def test_new_file_gets_the_umask_mode_and_replacing_keeps_the_old_mode(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write_bytes(tmp_path / "a.bin", b"one")
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600
    os.chmod(tmp_path / "a.bin", 0o640)
    atomic_write_bytes(tmp_path / "a.bin", b"two")
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o640
    assert (tmp_path / "a.bin").read_bytes() == b"two"


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "adapter.safetensors"
    target.write_bytes(b"precious")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]


@pytest.mark.parametrize("length", [0x280, 0x380, 0x480, 0x580])  # first bytes 80 02 .. 80 05: pickle's PROTO opcodes
def test_a_valid_file_whose_header_length_looks_like_a_pickle_is_read(tmp_path, length):
    import struct

    import torch
    from safetensors.torch import save

    from sdlora.safefiles import read_safetensors

    tensors = {"x": torch.arange(4, dtype=torch.float32)}
    for pad in range(length):  # safetensors pads the header to 8 bytes; find the metadata that makes it `length`
        blob = save(tensors, metadata={"note": "p" * pad})
        if struct.unpack("<Q", blob[:8])[0] == length:
            break
    else:
        pytest.fail(f"no header of length {length}")
    assert blob[:2] == bytes([0x80, length >> 8])
    path = tmp_path / "a.safetensors"
    path.write_bytes(blob)
    got, meta = read_safetensors(path)
    assert torch.equal(got["x"], tensors["x"]) and meta["note"] == "p" * pad
