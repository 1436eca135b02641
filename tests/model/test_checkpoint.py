"""Checkpoints: the config carries labels and preprocessing; older files with copies of them still load."""

from __future__ import annotations

import torch

from pipeline.config import config_to_dict
from pipeline.model.checkpoint import load_checkpoint
from tests.helpers import tiny_checkpoint


def test_payload_holds_each_setting_once(tmp_path):
    payload = torch.load(tiny_checkpoint(tmp_path / "model.pt"), weights_only=True)
    assert "labels" not in payload and "preprocess" not in payload
    assert payload["config"]["data"]["labels"] == {"background": 0, "lesion": 1}


def test_checkpoint_with_the_old_duplicate_keys_still_loads(tmp_path):
    path = tiny_checkpoint(tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    payload["labels"] = payload["config"]["data"]["labels"]  # written by medseg before these keys went
    payload["preprocess"] = payload["config"]["preprocess"]
    torch.save(payload, path)
    ckpt = load_checkpoint(path)
    assert ckpt.label_names == ["background", "lesion"]
    assert config_to_dict(ckpt.config)["preprocess"] == payload["preprocess"]
