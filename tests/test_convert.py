"""fastseg3d convert: official SegFormer3D state dicts <-> fastseg3d checkpoints."""

from __future__ import annotations

import fractions
import random
import warnings

import numpy as np
import pytest
import torch

import fastseg3d
from fastseg3d.convert import (
    fastseg3d_to_official,
    infer_segformer3d_config,
    load_state_dict_file,
    main,
    official_to_fastseg3d,
)
from fastseg3d.networks import SegFormer3D

# Non-default everywhere the shapes can show it, plus an anisotropic first stage (stride must be passed).
_KWARGS = dict(
    in_channels=2, out_channels=2, embed_dims=[8, 16, 24, 32], depths=[1, 2, 1, 1], num_heads=[1, 2, 3, 4],
    sr_ratios=[2, 2, 1, 1], mlp_ratio=2, patch_kernel_size=[[3, 7, 7], 3, 3, 3],
    patch_stride=[[2, 4, 4], 2, 2, 2], patch_padding=[[1, 3, 3], 1, 1, 1], decoder_dim=16,
)
_NOT_IN_SHAPES = dict(num_heads=[1, 2, 3, 4], patch_stride=[[2, 4, 4], 2, 2, 2])


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = SegFormer3D(**_KWARGS)
    for m in model.modules():  # non-trivial running statistics, so eval outputs depend on every buffer
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
    return model.eval()


def _input(model):
    return torch.randn(1, 2, *(2 * s for s in model.total_stride))


def test_infer_config(net):
    cfg = infer_segformer3d_config(net.state_dict(), **_NOT_IN_SHAPES)
    assert cfg == {**_KWARGS, "attention_scale": "head_dim"}
    with pytest.warns(UserWarning, match="num_heads"):
        assert infer_segformer3d_config(net.state_dict())["num_heads"] == [1, 2, 5, 8]
    with pytest.raises(ValueError, match="unknown"):
        infer_segformer3d_config(net.state_dict(), heads=2)


def test_infer_config_of_the_official_default():
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("error")
        # (the release's scale given: without it, converting the BraTS widths warns about it)
        cfg = infer_segformer3d_config(SegFormer3D().state_dict(), attention_scale="num_heads")
    with torch.device("meta"):
        assert sum(p.numel() for p in SegFormer3D(**cfg).parameters()) == 4_525_251
    assert cfg["patch_padding"] == [3, 1, 1, 1] and cfg["mlp_ratio"] == 4 and cfg["sr_ratios"] == [4, 2, 1, 1]


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "module-prefix-wrapped"])
def test_round_trip(tmp_path, net, wrapped):
    sd = net.state_dict()
    official = tmp_path / "pytorch_model.bin"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}} if wrapped else sd, official)

    converted = tmp_path / "out" / "segformer3d.pt"
    cfg = official_to_fastseg3d(official, converted, **_NOT_IN_SHAPES)
    ckpt = torch.load(converted, weights_only=True)
    assert ckpt["model"] == {"name": "segformer3d", "kwargs": cfg}
    assert ckpt["fastseg3d_version"] == fastseg3d.__version__
    assert "config" not in ckpt  # not a BraTS network: no data pipeline to assume
    rebuilt = SegFormer3D(**ckpt["model"]["kwargs"])
    rebuilt.load_state_dict(ckpt["network_weights"], strict=True)
    x = _input(net)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), net(x), rtol=0, atol=0)

    back = tmp_path / "back" / "pytorch_model.bin"
    assert fastseg3d_to_official(converted, back) == cfg
    restored = torch.load(back, weights_only=True)
    assert list(restored) == list(sd)
    for k, v in sd.items():
        assert restored[k].dtype == v.dtype and torch.equal(restored[k], v), k
    assert sorted(p.name for p in back.parent.iterdir()) == ["pytorch_model.bin"]  # no temporary left


def test_training_checkpoint_to_official(tmp_path, net):
    sd = net.state_dict()
    ckpt = tmp_path / "checkpoint_best.pt"
    torch.save({"network_weights": {f"_orig_mod.{k}": v for k, v in sd.items()},
                "model": {"name": "SegFormer3D", "kwargs": _KWARGS},
                "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "current_epoch": 3,
                "rng_state": {"python": random.getstate(), "numpy": np.random.get_state(),
                              "torch": torch.get_rng_state()}}, ckpt)
    fastseg3d_to_official(ckpt, tmp_path / "official.bin")
    restored = torch.load(tmp_path / "official.bin", weights_only=True)
    assert all(torch.equal(restored[k], v) for k, v in sd.items()) and len(restored) == len(sd)


def test_wrong_keys_are_listed(tmp_path, net):
    sd = dict(net.state_dict())
    del sd["segformer_encoder.tf_block2.1.attention.proj.bias"]
    sd["segformer_decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.bin"
    torch.save(sd, path)
    with pytest.raises(ValueError) as err:
        official_to_fastseg3d(path, tmp_path / "out.pt", **_NOT_IN_SHAPES)
    msg = str(err.value)
    assert "bad.bin" in msg and "missing keys (1)" in msg and "unexpected keys (1)" in msg
    assert "tf_block2.1.attention.proj.bias" in msg and "segformer_decoder.extra.weight" in msg
    assert not (tmp_path / "out.pt").exists()

    good = tmp_path / "ok.bin"
    torch.save(net.state_dict(), good)
    with pytest.raises(ValueError, match=r"shape mismatches \(1\)[\s\S]*patch_embeddings.weight"):
        official_to_fastseg3d(good, tmp_path / "out.pt", in_channels=3, **_NOT_IN_SHAPES)
    torch.save({"encoder.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="bad.bin.*not a SegFormer3D state_dict"):
        official_to_fastseg3d(path, tmp_path / "out.pt")


def test_unreadable_files_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.bin"
    corrupt.write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(ValueError, match="corrupt.bin") as err:
        load_state_dict_file(corrupt)
    # the loader's reason, and no --trusted hint: that is for files the safe loader refused, not corrupt ones
    assert "Unsupported operand" in str(err.value) and "--trusted" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="absent.bin"):
        load_state_dict_file(tmp_path / "absent.bin")
    with pytest.raises(FileNotFoundError, match="not a file"):
        load_state_dict_file(tmp_path)
    empty = tmp_path / "no_tensors.pt"
    torch.save({"epoch": 3, "model": {"name": "segformer3d"}}, empty)
    with pytest.raises(ValueError, match="no_tensors.pt.*no state_dict"):
        load_state_dict_file(empty)
    with pytest.raises(ValueError, match="no_tensors.pt.*not a fastseg3d checkpoint"):
        fastseg3d_to_official(empty, tmp_path / "x.bin")
    pickled = tmp_path / "objects.pt"
    torch.save({"network_weights": {"w": torch.zeros(1)}, "note": fractions.Fraction(1, 3)}, pickled)
    with pytest.raises(ValueError, match="objects.pt.*trusted"):
        fastseg3d_to_official(pickled, tmp_path / "x.bin")
    with pytest.raises(ValueError, match="objects.pt.*not a SegFormer3D state_dict"):
        fastseg3d_to_official(pickled, tmp_path / "x.bin", trusted=True)


def test_other_models_do_not_convert_to_official(tmp_path, net):
    path = tmp_path / "unet.pt"
    torch.save({"network_weights": net.state_dict(), "model": {"name": "unet", "kwargs": {}}}, path)
    with pytest.raises(ValueError, match="unet"):
        fastseg3d_to_official(path, tmp_path / "x.bin")


def test_command_line(tmp_path, net, capsys):
    official = tmp_path / "pytorch_model.bin"
    torch.save(net.state_dict(), official)
    converted = tmp_path / "fs.pt"
    assert main(["--from", "official-segformer3d", str(official), str(converted), "--num-heads", "1", "2", "3", "4",
                 "--patch-stride", "2,4,4", "2", "2", "2", "--attention-scale", "num_heads"]) == 0
    kwargs = torch.load(converted, weights_only=True)["model"]["kwargs"]
    assert kwargs["patch_stride"] == [[2, 4, 4], 2, 2, 2] and kwargs["attention_scale"] == "num_heads"
    assert main(["convert", "--to", "official-segformer3d", str(converted), str(tmp_path / "back.bin")]) == 0
    assert "back.bin" in capsys.readouterr().out

    assert main(["--to", "official-segformer3d", str(tmp_path / "nope.pt"), str(tmp_path / "o.bin")]) == 1
    assert "nope.pt" in capsys.readouterr().err
    assert main(["--to", "official-segformer3d", str(converted), str(tmp_path / "o.bin"), "--num-heads",
                 "1", "1", "1", "1"]) == 1
    assert "--num-heads" in capsys.readouterr().err
    # heads are not in the weights: the official default (1, 2, 5, 8) does not divide these widths
    with pytest.warns(UserWarning, match="--num-heads"):
        assert main(["--from", "official-segformer3d", str(official), str(tmp_path / "h.pt"),
                     "--patch-stride", "2,4,4", "2", "2", "2"]) == 1
    assert "divisible by num_heads" in (err := capsys.readouterr().err) and "pass --num-heads" in err
    assert main(["--from", "official-segformer3d", str(official), str(tmp_path)]) == 1  # a folder as the output
    assert capsys.readouterr().err.startswith("fastseg3d convert: error: ")
    # the output is the input: refused, the input kept (a training checkpoint would lose its optimizer state)
    before = converted.read_bytes()
    assert main(["--to", "official-segformer3d", str(converted), str(tmp_path / "." / converted.name)]) == 1
    assert "is the input file" in capsys.readouterr().err and converted.read_bytes() == before
    assert main(["--from", "official-segformer3d", str(official), str(official), "--num-heads", "1", "2", "3",
                 "4"]) == 1
    assert "is the input file" in capsys.readouterr().err
    extra = tmp_path / "extra.bin"
    torch.save({**net.state_dict(), "module_extra": torch.zeros(1)}, extra)
    assert main(["--from", "official-segformer3d", str(extra), str(tmp_path / "e.pt"), "--num-heads", "1", "2", "3",
                 "4", "--patch-stride", "2,4,4", "2", "2", "2"]) == 1
    assert "module_extra" in (err := capsys.readouterr().err) and "--num-heads" not in err
    with pytest.raises(SystemExit):
        main(["--from", "official-segformer3d", "--to", "official-segformer3d", "a", "b"])


def test_a_stage_of_depth_zero_converts(tmp_path):
    """SegFormer3D takes a stage without transformer blocks; its weights convert both ways."""
    net = SegFormer3D(embed_dims=(8, 16, 16, 16), num_heads=(1, 1, 1, 1), depths=(1, 1, 1, 0), decoder_dim=8)
    path = tmp_path / "official.bin"
    torch.save(net.state_dict(), path)
    config = official_to_fastseg3d(path, tmp_path / "fs.pt", num_heads=[1, 1, 1, 1])
    assert config["depths"] == [1, 1, 1, 0]
    rebuilt = SegFormer3D(**config)
    rebuilt.load_state_dict(torch.load(tmp_path / "fs.pt", weights_only=True)["network_weights"])


def test_a_stage_of_depth_zero_takes_no_spatial_reduction_stride():
    """A stage without blocks has no attention, so its sr ratio (which the official format cannot store: the
    converter gives it the default) does not constrain the input size."""
    kwargs = dict(embed_dims=(8, 16, 16, 16), num_heads=(1, 1, 1, 1), depths=(0, 1, 1, 1), decoder_dim=8,
                  patch_stride=(1, 1, 1, 1), patch_kernel_size=(3, 3, 3, 3), patch_padding=(1, 1, 1, 1))
    assert SegFormer3D(**kwargs, sr_ratios=(4, 1, 1, 1)).total_stride == (1, 1, 1)
    assert SegFormer3D(**{**kwargs, "depths": (1, 1, 1, 1)}, sr_ratios=(4, 1, 1, 1)).total_stride == (4, 4, 4)


def test_to_official_without_model_metadata_needs_only_the_weights(tmp_path):
    """What the weights do not store (heads, patch strides and paddings) cannot stop a checkpoint without model
    metadata from converting: widths the official heads do not divide, and an even patch kernel, convert."""
    net = SegFormer3D(in_channels=1, out_channels=2, embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4),
                      patch_kernel_size=(7, 2, 3, 3), patch_stride=(4, 2, 2, 2), patch_padding=(3, 0, 1, 1),
                      decoder_dim=8)
    torch.save({"network_weights": net.state_dict()}, tmp_path / "bare.pt")
    config = fastseg3d_to_official(tmp_path / "bare.pt", tmp_path / "official.bin")
    assert "num_heads" not in config and config["embed_dims"] == [8, 16, 24, 32]
    restored = torch.load(tmp_path / "official.bin", weights_only=True)
    assert list(restored) == list(net.state_dict())
    assert all(torch.equal(restored[k], v) for k, v in net.state_dict().items())


def test_malformed_checkpoints_are_one_line_errors(tmp_path, net, capsys):
    """Kwargs that are not a mapping, tensors without values to write, and an output whose folder is a file."""
    def error(*argv):
        assert main(list(argv)) == 1
        err = capsys.readouterr().err
        assert err.startswith("fastseg3d convert: error: ") and err.count("\n") == 1, err
        return err

    torch.save({"network_weights": net.state_dict(), "model": {"name": "segformer3d", "kwargs": [1, 2]}},
               tmp_path / "list.pt")
    assert "model.kwargs must be a mapping" in error("--to", "official-segformer3d", str(tmp_path / "list.pt"),
                                                     str(tmp_path / "o.bin"))
    heads = ["--num-heads", "1", "2", "3", "4", "--patch-stride", "2,4,4", "2", "2", "2"]
    meta = {k: v.to("meta") for k, v in net.state_dict().items()}
    torch.save(meta, tmp_path / "meta.bin")
    assert "is a meta tensor" in error("--from", "official-segformer3d", str(tmp_path / "meta.bin"),
                                       str(tmp_path / "m.pt"), *heads)
    sparse = {**net.state_dict(), "segformer_decoder.linear_pred.bias":
              net.state_dict()["segformer_decoder.linear_pred.bias"].to_sparse()}
    torch.save(sparse, tmp_path / "sparse.bin")
    assert "sparse" in error("--from", "official-segformer3d", str(tmp_path / "sparse.bin"), str(tmp_path / "s.pt"),
                             *heads)
    torch.save(net.state_dict(), tmp_path / "ok.bin")
    (tmp_path / "afile").write_text("")
    assert "a file stands where its folder" in error("--from", "official-segformer3d", str(tmp_path / "ok.bin"),
                                                     str(tmp_path / "afile" / "o.pt"), *heads)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    # a Lightning module's checkpoint: the keys found show the prefix to strip
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "last.ckpt")
    assert "it has 'model.segformer_encoder.embed_1.patch_embeddings.weight'" in error(
        "--from", "official-segformer3d", str(tmp_path / "last.ckpt"), str(tmp_path / "l.pt"), *heads)


def test_brats_weights_carry_the_recipe_data_pipeline(tmp_path):
    """Official BraTS weights (4 inputs, 3 outputs), converted, evaluate on the preprocessing they were trained on."""
    pytest.importorskip("yaml")
    from fastseg3d.train.config import DEFAULTS, load_config, merge

    with torch.device("meta"):
        sd = SegFormer3D().state_dict()
    official = tmp_path / "pytorch_model.bin"
    torch.save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in sd.items()}, official)
    with pytest.warns(UserWarning, match="--attention-scale num_heads"):  # the released weights' scale
        official_to_fastseg3d(official, tmp_path / "other.pt")
    assert official_to_fastseg3d(official, tmp_path / "segformer3d.pt",
                                 attention_scale="num_heads")["attention_scale"] == "num_heads"
    ckpt = torch.load(tmp_path / "segformer3d.pt", weights_only=True)
    recipe = load_config("segformer3d_brats")
    assert ckpt["config"] == recipe
    cfg = merge(DEFAULTS, ckpt["config"])  # as fastseg3d eval reads it
    assert cfg["data"]["label_mode"] == "brats_regions" and cfg["data"]["preprocess"] == recipe["data"]["preprocess"]


def test_a_failed_write_leaves_the_previous_output(tmp_path, monkeypatch):
    """The converted checkpoint is written to a temporary file and renamed: a write that fails part-way leaves the
    file already there as it was, and no temporary behind."""
    sd = SegFormer3D(in_channels=1, out_channels=2, embed_dims=[8, 16, 24, 32], num_heads=[1, 1, 1, 1],
                     decoder_dim=8).state_dict()
    src, out = tmp_path / "official.bin", tmp_path / "out.pt"
    torch.save(sd, src)
    out.write_bytes(b"previous checkpoint")

    def failing_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half-written")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        official_to_fastseg3d(src, out, num_heads=[1, 1, 1, 1])
    monkeypatch.undo()
    assert out.read_bytes() == b"previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["official.bin", "out.pt"]


def test_keys_that_collide_without_wrapper_prefixes_are_refused(tmp_path):
    f = tmp_path / "w.pt"
    torch.save({"module.fc.weight": torch.ones(2), "fc.weight": torch.zeros(2)}, f)
    with pytest.raises(ValueError, match="both become 'fc.weight'"):
        load_state_dict_file(f)


def test_an_even_patch_kernel_needs_its_padding_given(tmp_path):
    """The default patch padding is kernel // 2, which for an even kernel SegFormer3D does not take (2p = k): the
    conversion asks for the padding rather than guess it."""
    kw = dict(in_channels=1, out_channels=2, embed_dims=[8, 16, 24, 32], num_heads=[1, 1, 1, 1], decoder_dim=8,
              patch_kernel_size=[4, 3, 3, 3], patch_padding=[0, 1, 1, 1])
    sd = SegFormer3D(**kw).state_dict()
    assert infer_segformer3d_config(sd, num_heads=[1, 1, 1, 1])["patch_padding"] == [2, 1, 1, 1]
    src = tmp_path / "official.bin"
    torch.save(sd, src)
    with pytest.raises(ValueError, match="patch_padding"):
        official_to_fastseg3d(src, tmp_path / "out.pt", num_heads=[1, 1, 1, 1])
    assert official_to_fastseg3d(src, tmp_path / "out.pt", num_heads=[1, 1, 1, 1],
                                 patch_padding=[0, 1, 1, 1])["patch_padding"] == [0, 1, 1, 1]
