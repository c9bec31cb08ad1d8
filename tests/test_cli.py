"""The fastseg3d command line: info, and the subcommands' wiring (train/eval are tested in tests/train)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import fastseg3d


@pytest.mark.parametrize("value,active", [("1", True), ("true", True), ("ON", True), ("yes", True), ("0", False),
                                          ("false", False), ("", False)])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, active):
    """TRITON_INTERPRET=true turned Triton's interpreter on while fastseg3d took it as off (and refused CPU
    launches)."""
    from fastseg3d.backends import interpreter_requested

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreter_requested() is active


def test_the_interpreter_is_what_the_kernels_were_decorated_with():
    """TRITON_INTERPRET set after the kernels were imported changes nothing for them (Triton read it when it
    decorated them): fastseg3d keeps to the compiled kernels, so a CPU tensor under the triton backend gets the
    NotImplementedError naming the device, not a Triton launch that fails for want of a GPU driver."""
    code = ("import os, torch, fastseg3d, fastseg3d.kernels.dwconv3d\n"
            "from fastseg3d import backends\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "print(backends.interpreter_requested(), backends.interpreter_active())\n"
            "try:\n"
            "    with fastseg3d.backend('triton'):\n"
            "        fastseg3d.ops.dwconv3d(torch.randn(1, 2, 3, 3, 3), torch.randn(2, 1, 3, 3, 3))\n"
            "except NotImplementedError as e:\n"
            "    print('refused:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stderr
    assert lines[0] == "True False"
    assert lines[1].startswith("refused:") and "device=cpu" in lines[1]


@pytest.mark.parametrize("command", [["fastseg3d", "info"], ["fastseg3d.info"]])
def test_info_command_lists_versions_and_op_choices(command):
    """``python -m fastseg3d info`` and ``python -m fastseg3d.info`` (as ``python -m xformers.info``), the latter
    without runpy's warning about a module the package imported before running it."""
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", *command], capture_output=True,
                          text=True, check=True)
    assert "RuntimeWarning" not in proc.stderr
    out = proc.stdout
    for key in ("torch", "triton", "cuda", "monai", "device", "backend policy", "check_finite"):
        assert key in out
    assert torch.__version__ in out
    assert "dwconv3d" in out and "dwconv3d_tokens" in out
    assert "cuda extension    not built (optional" in out


@pytest.mark.parametrize("command", [["fastseg3d", "info"], ["fastseg3d.info"]])
def test_info_with_a_bad_environment_value_is_one_line(command):
    env = {**os.environ, "FASTSEG3D_BACKEND": "garbage"}
    proc = subprocess.run([sys.executable, "-m", *command], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: FASTSEG3D_BACKEND")


def test_info_console_script():
    """The `fastseg3d` command the install puts beside the interpreter (the README's `fastseg3d info`)."""
    import sysconfig

    # where pip puts this interpreter's scripts (a --user install's too), before whatever else is on the PATH
    places = [sysconfig.get_path("scripts"), sysconfig.get_path("scripts", f"{os.name}_user"),
              os.path.dirname(sys.executable)]
    script = shutil.which("fastseg3d", path=os.pathsep.join(places)) or shutil.which("fastseg3d")
    assert script is not None, "the install put no fastseg3d command on the PATH"
    out = subprocess.run([script, "info"], capture_output=True, text=True, check=True).stdout
    assert "fastseg3d environment" in out and "dwconv3d" in out


@pytest.mark.parametrize("value,policy", [("torch", "torch"), (" Triton ", "triton"), ("AUTO", "auto")])
def test_backend_environment_variable_sets_the_policy(value, policy):
    """FASTSEG3D_BACKEND's valid values, read at import: on a CPU without the interpreter ``triton`` refuses the
    depthwise conv, ``torch`` and ``auto`` run its reference."""
    code = ("import torch, fastseg3d\nprint(fastseg3d.get_backend())\ntry:\n"
            "    fastseg3d.ops.dwconv3d(torch.randn(1, 2, 3, 3, 3), torch.randn(2, 1, 3, 3, 3))\n    print('ran')\n"
            "except NotImplementedError as e:\n    print('refused:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "FASTSEG3D_BACKEND": value},
                          capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines[0] == policy, proc.stderr[-2000:]
    assert lines[1].startswith("refused:" if policy == "triton" else "ran"), lines
    if policy == "triton":
        assert "device=cpu" in lines[1]


def test_kernels_are_installed_only_as_fastseg3d_kernels(tmp_path):
    """The Triton kernels live in the repository's ``kernels/`` but install as ``fastseg3d.kernels``: outside the
    checkout, a bare ``import kernels`` does not find them."""
    code = "import importlib.util\nspec = importlib.util.find_spec('kernels')\nprint(spec.origin if spec else '')"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          check=True)
    import fastseg3d.kernels

    ours = os.path.dirname(os.path.realpath(fastseg3d.kernels.__file__))
    origin = proc.stdout.strip()
    assert not origin or os.path.dirname(os.path.realpath(origin)) != ours, origin


def test_op_choices_follow_policy():
    cpu = torch.device("cpu")
    assert fastseg3d.info.op_choices(cpu)[0][1] == "torch"
    assert "device=cpu" in fastseg3d.info.op_choices(cpu)[0][2]
    assert fastseg3d.info.op_choices("cpu") == fastseg3d.info.op_choices(cpu)  # a device's name too
    assert fastseg3d.info.op_choices(torch.device("meta"))[0][1] == "triton"
    with fastseg3d.backend("torch"):
        assert fastseg3d.info.op_choices(torch.device("meta"))[0] == ("dwconv3d", "torch", "FASTSEG3D_BACKEND=torch")
    with fastseg3d.backend("triton"):  # where the op raises, info says so
        name, choice, why = fastseg3d.info.op_choices(cpu)[0]
        assert choice == "error" and why.startswith("NotImplementedError") and "device=cpu" in why


def test_help_lists_every_subcommand():
    proc = subprocess.run([sys.executable, "-m", "fastseg3d", "--help"], capture_output=True, text=True, check=True)
    for command in ("train", "eval", "profile", "bench", "convert", "info"):
        assert command in proc.stdout


def test_profile_counts_the_configs_training_step(capsys):
    """The quickstart's step (SegFormer3D, 4 -> 5 channels, DiceCE) at 2x4x32^3: the lines add up to what
    training_memory counts for the network and its loss, and the largest cube fits the budget while the next side
    does not."""
    from fastseg3d.cli import _train_step, main
    from fastseg3d.profile import largest_cube, training_memory
    from fastseg3d.train import load_config
    from fastseg3d.train.builders import build_model, build_objective

    assert main(["profile", "--config", "quickstart", "--size", "32", "--max-memory", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "4 -> 5 channels; a training step on 2x4x32x32x32, fp32" in out and "(dice_ce)" in out
    for phase in ("forward", "backward"):
        line = next(line for line in out.splitlines() if line.strip().startswith(f"{phase} writes"))
        assert " ops; most: aten::" in line, line
    step = _train_step(build_model(load_config("quickstart")["model"], 4, 5),
                       build_objective(load_config("quickstart"), "softmax", 5), "softmax", 5)
    total = training_memory(step, (2, 4, 32, 32, 32))["total"]
    line = next(line for line in out.splitlines() if line.strip().startswith("at least"))
    assert f" {total / 2**20:.1f} MiB" in line, (line, total)
    side = largest_cube(step, 2, 4, 2**28)
    assert f"fits 0.25 GiB: {side}^3" in out
    assert training_memory(step, (2, 4, side, side, side))["total"] <= 2**28
    assert training_memory(step, (2, 4, side + 32, side + 32, side + 32))["total"] > 2**28


def test_profile_counts_the_plain_compositions_under_backend_torch(capsys):
    """The config's backend applies as in training: backend=torch counts the references and plain norm chains
    (SegFormer3D's Mix-FFN then saves its BatchNorm and GELU outputs), for a fused-against-plain comparison."""
    import fastseg3d
    from fastseg3d.cli import main

    def saved(*overrides):
        assert main(["profile", "--config", "quickstart", *overrides, "--size", "32"]) == 0
        out = capsys.readouterr().out
        line = next(line for line in out.splitlines() if line.strip().startswith("saved by the network"))
        value, unit = line.split()[4:6]
        return out, float(value) * (1024 if unit == "GiB" else 1)

    fused_out, fused = saved()
    plain_out, plain = saved("backend=torch")
    assert "; backend torch" in plain_out and "backend" not in fused_out.splitlines()[0]
    assert plain > 1.2 * fused, (plain, fused)
    assert fastseg3d.get_backend() == "auto"


def test_overrides_anywhere_and_config_errors_in_one_line(capsys):
    """key=value overrides between options reach the config (argparse alone takes one run of positionals), and a
    wrong key is one line on stderr, not a traceback."""
    from fastseg3d.cli import main

    assert main(["profile", "--config", "quickstart", "data.batch_size=3", "--dtype", "fp32", "train.epochs=1",
                 "--size", "32"]) == 0
    assert "a training step on 3x4x32x32x32" in capsys.readouterr().out
    assert main(["profile", "--config", "quickstart", "optimizer.lrr=3", "--size", "32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'optimizer.lrr'") and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["profile", "--config", "quickstart", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["train", "--config", "quickstart"], ["profile", "--config", "quickstart"],
                                     ["eval", "--checkpoint", "missing.pt"]])
def test_commands_without_the_training_extra_say_so_in_one_line(capsys, monkeypatch, command):
    """Without MONAI (a plain ``pip install fastseg3d``) train, eval and profile end at once with the install to
    run, not with a traceback from the loss's import."""
    from fastseg3d.cli import main

    monkeypatch.setitem(sys.modules, "monai", None)  # import monai raises ImportError
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: fastseg3d {command[0]} needs the training extra (")
    assert "monai" in err.splitlines()[0] and "not importable" in err
    assert "pip install 'fastseg3d[train]'" in err and "Traceback" not in err


def test_profile_overrides_after_size(capsys):
    """--size takes one or three sides, and key=value tokens after it stay overrides (its nargs would take them)."""
    from fastseg3d.cli import main

    assert main(["profile", "--config", "quickstart", "--size", "32", "backend=torch", "data.batch_size=3"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "a training step on 3x4x32x32x32" in first and first.endswith("; backend torch")
    assert main(["profile", "--config", "quickstart", "--size", "32", "64", "96", "data.batch_size=1"]) == 0
    assert "a training step on 1x4x32x64x96" in capsys.readouterr().out
    assert main(["profile", "--config", "quickstart", "--size", "data.batch_size=1"]) == 2
    assert "--size takes D H W or one side, got []" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["profile", "--config", "quickstart", "--size", "big"])
    assert "'big' is neither a side (an integer) nor a key=value override" in capsys.readouterr().err


def test_profile_of_a_network_with_one_input_size(capsys):
    """MONAI's UNETR takes its img_size only: other sizes fail inside its ops (a RuntimeError), one line, exit 2."""
    from fastseg3d.cli import main

    net = ["model.name=monai.networks.nets.UNETR", "data.spatial_size=16", "model.kwargs={img_size: [16, 16, 16], "
           "feature_size: 4, hidden_size: 32, mlp_dim: 32, num_heads: 2}"]
    assert main(["profile", "--config", "quickstart", *net]) == 0
    capsys.readouterr()
    assert main(["profile", "--config", "quickstart", "--size", "32", *net]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the network cannot run a training step at this size") and err.count("\n") == 1


def test_profile_largest_cube_steps_by_the_networks_stride(capsys):
    """A 7-level U-Net (stride 64): the search ended with the network's error about a side no one asked for (64^3,
    a one-voxel bottleneck; 160^3, off its stride); it now tries multiples of 64 from 128."""
    import re

    from fastseg3d.cli import main

    assert main(["profile", "--config", "dsd_unet", "--size", "128", "--batch", "1", "--dtype", "bf16",
                 "model.kwargs.channels=[4,4,4,4,4,4,4]", "--max-memory", "2"]) == 0
    side = int(re.search(r"largest cube at batch 1 whose estimate fits 2 GiB: (\d+)\^3", capsys.readouterr().out)[1])
    assert side >= 128 and side % 64 == 0


@pytest.mark.parametrize("argv,message", [
    (["--batch", "0"], "--batch: must be a positive integer, got 0"),
    (["--batch", "-2"], "--batch: must be a positive integer, got -2"),
    (["--size", "0"], "a side must be a positive integer, got 0"),
    (["--max-memory", "0"], "--max-memory: must be a positive finite number of GiB, got 0"),
    (["--max-memory", "inf"], "--max-memory: must be a positive finite number of GiB, got inf"),
    (["--max-memory", "nan"], "--max-memory: must be a positive finite number of GiB, got nan"),
])
def test_profile_rejects_bad_numbers(capsys, argv, message):
    """Zero was read as unset (--batch 0 profiled the config's batch), the rest ended in tracebacks."""
    from fastseg3d.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "--config", "quickstart", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_profile_reports_setup_errors_in_one_line(capsys):
    from fastseg3d.cli import main

    # a size the network's strides do not divide, and an unknown backend
    for argv, message in ((["--size", "33"], "error: "),
                          (["backend=bogus"], "error: config key 'backend' must be one of null, 'auto'"),
                          (["train.amp=bf17"], "error: config key 'train.amp' must be one of 'none', 'bf16'"),
                          (["train.compile=bogus"], "error: config key 'train.compile' must be one of false, true"),
                          (["optimizer.name=bogus"], "error: config key 'optimizer.name' must be one of"),
                          (["scheduler.name=bogus"], "error: config key 'scheduler.name' must be one of"),
                          (["data.name=bogus"], "error: config key 'data.name' must be one of"),
                          (["model.kwargs.bogus=1"], "error: model.name=segformer3d with model.kwargs"),
                          (["model.name=unet"], "error: model.name=unet with model.kwargs"),
                          (["train=1", "train.amp=bf16"], "error: override 'train.amp=bf16' conflicts with the "
                                                          "earlier override of 'train'")):
        assert main(["profile", "--config", "quickstart", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(message) and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_backend_key_is_read_as_the_backend_context_reads_it():
    from fastseg3d.train import load_config

    assert load_config("quickstart", ["backend=Torch"])["backend"] == "Torch"  # fastseg3d.backend() lowers it
    with pytest.raises(ValueError, match="config key 'backend' must be one of"):
        load_config("quickstart", ["backend=cudnn"])


def test_bad_environment_variables_are_one_line_errors():
    """A bad FASTSEG3D_BACKEND or FASTSEG3D_CHECK_FINITE does not break `import fastseg3d` or --help; a command
    says what is wrong in one line (exit status 2), and an op raises ValueError."""
    for name, value in (("FASTSEG3D_BACKEND", "bogus"), ("FASTSEG3D_CHECK_FINITE", "2")):
        env = {**os.environ, name: value}
        assert subprocess.run([sys.executable, "-m", "fastseg3d", "--help"], env=env, capture_output=True,
                              text=True).returncode == 0
        proc = subprocess.run([sys.executable, "-m", "fastseg3d", "info"], env=env, capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"error: {name} must be " + ("one of ('auto', 'triton', 'torch'), got 'bogus'" if value == "bogus"
                                         else "0 or 1, got '2'")], proc.stderr
    code = ("import torch, fastseg3d\ntry:\n    fastseg3d.ops.dwconv3d(torch.randn(1, 2, 3, 3, 3), "
            "torch.randn(2, 1, 3, 3, 3))\nexcept ValueError as e:\n    print(e)\n"
            "with fastseg3d.backend('torch'):\n    fastseg3d.ops.dwconv3d(torch.randn(1, 2, 3, 3, 3), "
            "torch.randn(2, 1, 3, 3, 3))\n")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FASTSEG3D_BACKEND": "bogus"},
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "FASTSEG3D_BACKEND must be one of" in proc.stdout, proc.stderr[-2000:]


def test_profile_counts_amsgrads_third_state(capsys):
    from fastseg3d.cli import main

    def optimizer_line(*overrides):
        assert main(["profile", "--config", "missu_brats", "--size", "32", "--batch", "1", *overrides]) == 0
        out = capsys.readouterr().out
        params = next(line for line in out.splitlines() if "parameters and buffers" in line)
        return next(line for line in out.splitlines() if "optimizer state" in line), params

    with_amsgrad, params = optimizer_line()
    without, _ = optimizer_line("optimizer.amsgrad=false")
    assert with_amsgrad.endswith("(adam, amsgrad)") and without.endswith("(adam)")
    mib = [float(line.split()[2]) for line in (with_amsgrad, without)]
    assert abs(mib[0] / mib[1] - 1.5) < 0.01, (with_amsgrad, without, params)


def test_profile_of_an_msd_config_without_its_folder_takes_the_networks_channels(capsys):
    from fastseg3d.cli import main

    assert main(["profile", "--config", "segformer3d_brats", "--size", "64", "--batch", "1", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "4 -> 3 channels; a training step on 1x4x64x64x64, bf16 autocast" in out
    assert "data.root is not set" in out and "(dice)" in out
    assert main(["profile", "--config", "quickstart", "--size", "32", "48"]) == 2
    assert "--size takes D H W or one side" in capsys.readouterr().err


def test_bench_forwards_to_the_suite(tmp_path, capsys):
    """`fastseg3d bench ops|model [--case NAME] [--dtype ...] [--json [PATH]]`: rows for the asked case and dtype,
    as a JSON array in PATH, or as JSON lines on stdout with a bare --json."""
    import json

    from fastseg3d.cli import main

    out = tmp_path / "rows.json"
    assert main(["bench", "ops", "--case", "selfreg", "--quick", "--dtype", "fp32", "--out", str(tmp_path),
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows and {(r["case"], r["dtype"]) for r in rows} == {("selfreg", "fp32")}
    assert all(r["median_ms"] > 0 for r in rows)
    capsys.readouterr()
    assert main(["bench", "model", "--case", "segformer3d", "--quick", "--dtype", "fp32", "--modes", "infer",
                 "--providers", "fastseg3d", "--out", str(tmp_path), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines and all((r["suite"], r["case"], r["mode"], r["provider"]) == ("model", "segformer3d", "infer",
                                                                              "fastseg3d") for r in lines)


def test_import_without_triton_falls_back_to_reference():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fastseg3d\n"
        "assert not fastseg3d.backends.HAS_TRITON\n"
        "x, w = torch.randn(1, 2, 3, 4, 5), torch.randn(2, 1, 3, 3, 3)\n"
        "y = fastseg3d.ops.dwconv3d(x, w)\n"
        "xm, wm = (torch.empty(t.shape, device='meta', requires_grad=True) for t in (x, w))\n"
        "fastseg3d.ops.dwconv3d(xm, wm, activation='gelu').sum().backward()  # the eager op path on meta\n"
        "assert wm.grad.shape == w.shape\n"
        "print(fastseg3d.info.op_choices(torch.device('cpu'))[0][2])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "triton is not installed" in proc.stdout


@pytest.mark.parametrize("overrides,expected", [([], True), (["train.compile=reduce-overhead"], "reduce-overhead")])
def test_train_compile_flag_keeps_a_mode_the_config_names(monkeypatch, overrides, expected):
    import fastseg3d.train
    from fastseg3d.cli import main

    seen = []

    class Stop(Exception):
        pass

    def trainer(cfg, *args, **kwargs):
        seen.append(cfg["train"]["compile"])
        raise Stop

    monkeypatch.setattr(fastseg3d.train, "Trainer", trainer)
    with pytest.raises(Stop):
        main(["train", "--config", "quickstart", "--compile", *overrides])
    assert seen == [expected]


def test_profile_of_a_wrapped_monai_network(capsys):
    """model.wrap on a MONAI network: the count covers the DSD heads and their loss (more saved than the bare
    network with its plain loss)."""
    pytest.importorskip("monai.networks.nets")
    from fastseg3d.cli import main

    net = ["model.name=monai.networks.nets.DynUNet", "model.kwargs={spatial_dims: 3, kernel_size: [3, 3, 3], "
           "strides: [1, 2, 2], upsample_kernel_size: [2, 2], filters: [4, 8, 16]}", "data.in_channels=1"]

    def saved(*overrides):
        assert main(["profile", "--config", "quickstart", "--size", "32", "--batch", "1", *net, *overrides]) == 0
        out = capsys.readouterr().out
        network = next(line for line in out.splitlines() if "saved by the network" in line)
        loss = next(line for line in out.splitlines() if "saved by the loss" in line)
        return float(network.split()[4]) + float(loss.split()[4]), network, loss

    (wrapped, network, loss), (bare, _, _) = saved("model.wrap=dsd", "loss.distill=dsd"), saved()
    assert wrapped > bare and "encoder_heads" in network and "dice_ce + dsd" in loss, (wrapped, bare, loss)


_OPS = ("dwconv3d", "dwconv3d_tokens", "attention", "kl_distill", "channel_kl", "selfreg_inter", "selfreg_intra",
        "group_norm_act", "layer_norm", "add_layer_norm", "upsample_sum")


def test_every_op_choice_follows_the_device_and_the_dtype():
    """Every op, not only the first: on a CPU without the interpreter each falls back for the device (that reason
    alone); on meta (no device reason) an fp64 input falls back for its dtype, and a bf16 one takes the kernel."""
    from fastseg3d.info import op_choices

    cpu = op_choices("cpu")
    assert [name for name, _, _ in cpu] == list(_OPS)
    assert all(choice == "torch" and why.startswith("device=cpu") for _, choice, why in cpu), cpu
    # the interpreter's bf16 caveat is about a device the kernels launch on: not added to the device's reason
    assert not any("interpreter, which multiplies" in why for _, _, why in cpu), cpu
    fp64 = op_choices("meta", torch.float64)
    assert all(choice == "torch" and "dtype=torch.float64" in why for _, choice, why in fp64), fp64
    assert all(choice == "triton" for _, choice, _ in op_choices("meta", torch.bfloat16))


def test_info_prints_each_ops_choice_and_reason(capsys, monkeypatch):
    """`fastseg3d info`'s op lines name the implementation and why (on a CPU: the device)."""
    from fastseg3d import info

    monkeypatch.setattr(info, "collect", lambda: {"fastseg3d": fastseg3d.__version__})  # the versions: elsewhere
    assert info.main() == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("ops (bf16 input on the default device)")
    ops = lines[start + 1:]
    assert [line.split()[0] for line in ops] == list(_OPS)
    expected = {name: (choice, why) for name, choice, why in info.op_choices()}
    for line in ops:
        name, choice, why = line.split(maxsplit=2)
        assert (choice, why) == expected[name], line
    if not torch.cuda.is_available():
        assert all("device=cpu" in line for line in ops)


def test_info_reports_the_interpreter_and_the_finite_checks(monkeypatch):
    from fastseg3d.info import collect

    from fastseg3d.kernels import utils as kernel_utils

    # as the kernels were decorated
    monkeypatch.setattr(kernel_utils, "INTERPRET", False)
    assert collect()["TRITON_INTERPRET"] == "0"
    monkeypatch.setattr(kernel_utils, "INTERPRET", True)
    assert collect()["TRITON_INTERPRET"] == "1"
    with fastseg3d.check_finite(False):
        assert collect()["check_finite"] == "off"
    with fastseg3d.check_finite():
        assert collect()["check_finite"] == "on"


def test_profile_default_batch_of_an_msd_config_is_its_crops_per_step(capsys):
    """An MSD config's step holds data.batch_size volumes x data.num_samples crops (segformer3d_brats: 2 x 4)."""
    from fastseg3d.cli import main
    from fastseg3d.train import load_config

    data = load_config("segformer3d_brats")["data"]
    assert main(["profile", "--config", "segformer3d_brats", "--size", "32"]) == 0
    batch = data["batch_size"] * data["num_samples"]
    assert batch == 8 and f"a training step on {batch}x4x32x32x32" in capsys.readouterr().out


def test_profile_counts_sgds_momentum_buffer_only_with_momentum(capsys):
    from fastseg3d.cli import main

    def lines(*overrides):
        assert main(["profile", "--config", "quickstart", "--size", "32", "optimizer.name=sgd", *overrides]) == 0
        out = capsys.readouterr().out.splitlines()
        return [next(line for line in out if line.strip().startswith(key)) for key in ("gradients", "optimizer")]

    grads, state = lines("optimizer.momentum=0.9")
    assert state.split()[2:4] == grads.split()[1:3] and state.endswith("(sgd)")  # one buffer per parameter
    _, state = lines("optimizer.momentum=0")
    assert state.split()[2:4] == ["0.0", "MiB"] and state.endswith("(sgd)")


def test_profile_network_line_is_the_network_alone(capsys):
    """"saved by the network" is what the network saves (activation_memory of the model by itself), the loss's
    share on its own line."""
    from fastseg3d.cli import main
    from fastseg3d.profile import activation_memory
    from fastseg3d.train import load_config
    from fastseg3d.train.builders import build_model

    assert main(["profile", "--config", "quickstart", "--size", "32"]) == 0
    out = capsys.readouterr().out.splitlines()
    line = next(line for line in out if line.strip().startswith("saved by the network"))
    network = activation_memory(build_model(load_config("quickstart")["model"], 4, 5), (2, 4, 32, 32, 32))["total"]
    assert line.split()[4:6] == [f"{network / 2**20:.1f}", "MiB"], (line, network)
    loss = next(line for line in out if line.strip().startswith("saved by the loss"))
    assert float(loss.split()[4]) > 0  # the DiceCE saves something, which the network's line must not hold


def test_profile_max_memory_is_in_gib(capsys):
    """--max-memory is GiB (2**30 bytes): a budget just above the 64^3 step's estimate takes 64^3, which the same
    number of GB (1e9 bytes) would not fit."""
    import math

    from fastseg3d.cli import _train_step, main
    from fastseg3d.profile import training_memory
    from fastseg3d.train import load_config
    from fastseg3d.train.builders import build_model, build_objective

    cfg = load_config("quickstart")
    step = _train_step(build_model(cfg["model"], 4, 5), build_objective(cfg, "softmax", 5), "softmax", 5)

    def total(side):
        return training_memory(step, (2, 4, side, side, side))["total"]

    gib = math.ceil(total(64) / 2**30 * 1e4) / 1e4
    assert total(64) <= gib * 2**30 < total(96) and gib * 1e9 < total(64)
    assert main(["profile", "--config", "quickstart", "--max-memory", str(gib)]) == 0
    assert f"whose estimate fits {gib:g} GiB: 64^3" in capsys.readouterr().out


def test_bench_passes_every_argument_to_the_suite(capsys):
    """`fastseg3d bench model --list`: the suite word reaches bench.run (the model cases only are listed)."""
    from fastseg3d.cli import main

    assert main(["bench", "model", "--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    assert "segformer3d" in listed and "dwconv3d" not in listed and "kl_distill" not in listed


# --- behaviour pinned by the mutation round on cli.py, info.py and backends.py

@pytest.mark.parametrize("value,policy", [("", "auto"), ("  ", "auto"), ("Torch", "torch")])
def test_an_empty_backend_variable_is_auto(monkeypatch, value, policy):
    """`FASTSEG3D_BACKEND=` (set but empty, as a shell or CI matrix leaves it) means the default, not an error."""
    from fastseg3d import backends

    monkeypatch.setenv("FASTSEG3D_BACKEND", value)
    assert backends._from_env() == policy


@pytest.mark.parametrize("value", ["y", "Y", "on"])
def test_triton_interpret_takes_every_spelling_triton_does(monkeypatch, value):
    """Triton's truthy spellings include y and on: fastseg3d must not take the interpreter as off for them."""
    from fastseg3d.backends import interpreter_requested

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreter_requested()


@pytest.mark.parametrize("value,enabled", [("", False), ("0", False), ("false", False), ("1", True), ("true", True),
                                           (" TRUE ", True)])
def test_check_finite_variable_takes_true_and_an_empty_value(monkeypatch, value, enabled):
    """FASTSEG3D_CHECK_FINITE's documented spellings: true/1 turn the checks on, empty/0/false leave them off."""
    from fastseg3d import backends

    monkeypatch.setenv("FASTSEG3D_CHECK_FINITE", value)
    assert backends._check_finite_from_env() is enabled


def test_cuda_tensors_can_launch_the_kernels():
    """A CUDA device has no device reason (the kernels' home), so `info` on a GPU says triton for every op."""
    pytest.importorskip("triton")
    from fastseg3d import backends
    from fastseg3d.info import op_choices

    assert backends.device_reasons(torch.device("cuda")) == []
    assert backends.device_reasons(torch.device("cuda", 1)) == []
    with fastseg3d.backend("auto"):
        choices = op_choices("cuda")
    assert [name for name, _, _ in choices] == list(_OPS)
    assert all((how, why) == ("triton", "fused kernel supports this case") for _, how, why in choices), choices


def test_cpu_interpreter_launches_only_under_the_triton_policy(monkeypatch):
    """With TRITON_INTERPRET=1 but the default auto policy, CPU tensors still take the reference (the interpreter
    is for testing kernels, opted into with FASTSEG3D_BACKEND=triton), not a crawl through the interpreter."""
    pytest.importorskip("triton")
    from fastseg3d import backends

    monkeypatch.setattr(backends, "interpreter_active", lambda: True)
    cpu = torch.device("cpu")
    with fastseg3d.backend("auto"):
        assert backends.device_reasons(cpu) and "device=cpu" in backends.device_reasons(cpu)[0]
    with fastseg3d.backend("torch"):
        assert backends.device_reasons(cpu)
    with fastseg3d.backend("triton"):
        assert backends.device_reasons(cpu) == []


def test_no_fallback_is_logged_under_the_torch_policy(caplog):
    """The torch policy is a choice, not a fallback: select() says nothing (the log-once message is for auto)."""
    import logging

    from fastseg3d import backends

    backends._logged.clear()
    with caplog.at_level(logging.INFO, logger="fastseg3d"), fastseg3d.backend("torch"):
        assert not backends.select("dwconv3d", [], torch.device("cuda"))
        assert not backends.select("dwconv3d", ["dtype=torch.float64"], torch.device("cuda"))
    assert not [r for r in caplog.records if "falls back" in r.getMessage()]


def test_a_fallback_on_meta_is_info_not_a_warning(caplog):
    """Only a CUDA tensor's fallback costs the user speed or memory and warns; meta (memory accounting) logs INFO."""
    import logging

    from fastseg3d import backends

    backends._logged.clear()
    with caplog.at_level(logging.INFO, logger="fastseg3d"), fastseg3d.backend("auto"):
        assert not backends.select("dwconv3d", ["stride=2 (meta probe)"], torch.device("meta"))
    assert [r.levelno for r in caplog.records if "falls back" in r.getMessage()] == [logging.INFO]


def test_info_reports_a_missing_module_as_not_installed(monkeypatch):
    """An optional dependency that does not import (no MONAI) is reported, not a traceback from `fastseg3d info`."""
    from fastseg3d.info import collect

    monkeypatch.setitem(sys.modules, "monai", None)  # import monai raises ImportError
    assert collect()["monai"] == "not installed"


def test_info_default_device_is_the_gpu_when_there_is_one(monkeypatch):
    """`fastseg3d info` on a GPU machine reports the ops' choices for CUDA tensors, not for the CPU."""
    from fastseg3d.info import op_choices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert op_choices() == op_choices("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert op_choices() == op_choices("cpu")


def test_info_reports_the_policy_in_force_and_a_cpu_build(monkeypatch):
    """The backend line follows fastseg3d.backend() (not a constant), and a CPU build of torch says so in words."""
    from fastseg3d.info import collect

    with fastseg3d.backend("torch"):
        assert collect()["backend policy"] == "torch"
    monkeypatch.setattr(torch.version, "cuda", None)
    assert collect()["cuda"] == "none (CPU build of torch)"


def test_info_aligns_the_op_columns(capsys, monkeypatch):
    """The why column starts at one offset whatever the implementation's name (triton, torch, error)."""
    from fastseg3d import info

    monkeypatch.setattr(info, "collect", lambda: {"fastseg3d": fastseg3d.__version__})
    monkeypatch.setattr(info, "op_choices", lambda: [("dwconv3d", "triton", "A"), ("attention", "torch", "B"),
                                                     ("layer_norm", "error", "C")])
    assert info.main() == 0
    lines = capsys.readouterr().out.splitlines()
    ops = lines[lines.index("ops (bf16 input on the default device)") + 1:]
    assert len({line.index(why) for line, why in zip(ops, "ABC")}) == 1, ops


def test_commands_without_yaml_say_so_in_one_line(capsys, monkeypatch):
    """PyYAML is part of the training extra too: without it the configs cannot load, and the message names it."""
    from fastseg3d.cli import main

    monkeypatch.setitem(sys.modules, "yaml", None)
    assert main(["eval", "--checkpoint", "missing.pt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: fastseg3d eval needs the training extra (yaml not importable)"), err


def test_a_missing_config_is_a_one_line_error(capsys):
    """--config naming no file or recipe: one line and exit 2, not a FileNotFoundError traceback."""
    from fastseg3d.cli import main

    assert main(["profile", "--config", "no_such_recipe"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config 'no_such_recipe' not found") and err.count("\n") == 1, err


def test_train_flags_reach_the_config(monkeypatch):
    """--amp, --seed, --device, --backend, --deterministic, --epochs and --max-steps set their own config keys."""
    import fastseg3d.train
    from fastseg3d.cli import main

    seen = []

    class Stop(Exception):
        pass

    def trainer(cfg, *args, **kwargs):
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr(fastseg3d.train, "Trainer", trainer)
    with pytest.raises(Stop):
        main(["train", "--config", "quickstart", "--amp", "fp16", "--seed", "7", "--device", "cpu", "--backend",
              "triton", "--deterministic", "--epochs", "5", "--max-steps", "9", "--val-every", "3",
              "--save-every", "4"])
    cfg = seen[0]
    assert (cfg["train"]["amp"], cfg["seed"], cfg["device"], cfg["backend"], cfg["deterministic"]) == (
        "fp16", 7, "cpu", "triton", True)
    assert (cfg["train"]["epochs"], cfg["train"]["max_steps"]) == (5, 9)
    assert (cfg["val"]["every"], cfg["checkpoint"]["save_every"]) == (3, 4)


def _eval_call(monkeypatch, tmp_path, *argv):
    """Run `fastseg3d eval` on an empty checkpoint file with evaluate_checkpoint replaced: its keyword arguments."""
    import fastseg3d.train.evaluate  # noqa: F401
    from fastseg3d.cli import main

    seen = {}

    def evaluate(checkpoint, out, **kwargs):
        seen.update(kwargs, out=out)
        return {"num_cases": 1, "class_names": ["a"], "dice": 0.5, "dice_per_class": [0.5]}

    monkeypatch.setattr(sys.modules["fastseg3d.train.evaluate"], "evaluate_checkpoint", evaluate)
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"")
    assert main(["eval", "--checkpoint", str(ckpt), *argv]) == 0
    return seen


def test_eval_flags_reach_the_evaluation(monkeypatch, tmp_path, capsys):
    """--roi, --overlap, --sw-batch-size, --blend and --max-cases override the run's val settings, --no-hd95 and
    --msd pick the distances; the defaults: device auto, the val split, HD95 on, <checkpoint folder>/eval."""
    seen = _eval_call(monkeypatch, tmp_path)
    assert (seen["device"], seen["split"], seen["out"]) == ("auto", "val", tmp_path.resolve() / "eval")
    assert seen["val_overrides"] == {"hd95": True, "msd": False}
    assert f"results in {tmp_path.resolve() / 'eval' / 'eval_metrics.json'}" in capsys.readouterr().out
    seen = _eval_call(monkeypatch, tmp_path, "--roi", "16", "24", "32", "--overlap", "0.25", "--sw-batch-size", "3",
                      "--blend", "constant", "--max-cases", "1", "--no-hd95", "--msd")
    assert seen["val_overrides"] == {"roi_size": [16, 24, 32], "overlap": 0.25, "sw_batch_size": 3,
                                     "blend": "constant", "max_cases": 1, "hd95": False, "msd": True}
    with pytest.raises(SystemExit):  # a window is three sides
        _eval_call(monkeypatch, tmp_path, "--roi", "16", "16")


def test_eval_max_cases_must_be_positive(capsys, tmp_path):
    """--max-cases 0 would evaluate nothing and report an empty mean: refused before anything loads."""
    from fastseg3d.cli import main

    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"")
    assert main(["eval", "--checkpoint", str(ckpt), "--max-cases", "0"]) == 2
    assert capsys.readouterr().err == "error: --max-cases must be >= 1, got 0\n"


@pytest.mark.parametrize("mode,names,dice,shown", [
    ("softmax", ["background", "liver", "tumour"], [0.25, None], "liver 0.250, tumour n/a"),
    ("sigmoid", ["TC", "WT", "ET"], [0.5, 0.75, 1.0], "TC 0.500, WT 0.750, ET 1.000"),
])
def test_train_prints_the_foreground_classes_dice(monkeypatch, tmp_path, capsys, mode, names, dice, shown):
    """The final line names each foreground class by its Dice: softmax's background channel is not one of them."""
    import types

    import fastseg3d.train
    from fastseg3d.cli import main

    class Trainer:
        is_main, owns_process_group, run_dir = True, False, tmp_path

        def __init__(self, cfg, *args, **kwargs):
            self.data = types.SimpleNamespace(class_names=names, mode=mode)

        def fit(self):
            return {"dice": 0.5, "dice_per_class": dice}

    monkeypatch.setattr(fastseg3d.train, "Trainer", Trainer)
    assert main(["train", "--config", "quickstart"]) == 0
    assert f"final validation: mean foreground Dice 0.5000 ({shown})\n" in capsys.readouterr().out


def test_sizes_switch_to_gib_at_one_gib():
    from fastseg3d.cli import _size

    assert _size(2**30) == "1.00 GiB" and _size(2**30 - 2**20) == "1023.0 MiB"


def test_profile_counts_no_amsgrad_state_for_sgd(capsys):
    """optimizer.amsgrad is Adam's: SGD without momentum keeps no state whatever the key says."""
    from fastseg3d.cli import main

    assert main(["profile", "--config", "quickstart", "--size", "32", "optimizer.name=sgd", "optimizer.momentum=0",
                 "optimizer.amsgrad=true"]) == 0
    state = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("optimizer"))
    assert state.split()[2:4] == ["0.0", "MiB"] and state.endswith("(sgd)"), state


def test_profile_says_activation_checkpointing_is_not_modelled(capsys):
    from fastseg3d.cli import main

    assert main(["profile", "--config", "quickstart", "--size", "32", "train.activation_checkpointing=true"]) == 0
    assert "train.activation_checkpointing is on: not modelled" in capsys.readouterr().out


def test_profile_counts_fp16_as_fp16(capsys):
    """--dtype fp16 is a choice and counts an fp16 step: DSD's loss saves more under fp16 than under bf16."""
    from fastseg3d.cli import _train_step, main
    from fastseg3d.profile import activation_memory
    from fastseg3d.train import load_config
    from fastseg3d.train.builders import build_model, build_objective, output_mode

    with fastseg3d.backend("auto"):  # the fused loss is what tells fp16 from bf16 here
        assert main(["profile", "--config", "dsd_unet", "--size", "32", "--batch", "1", "--dtype", "fp16"]) == 0
        out = capsys.readouterr().out
        cfg = load_config("dsd_unet")
        mode = output_mode(cfg["data"]["label_mode"])
        step = _train_step(build_model(cfg["model"], 1, 2), build_objective(cfg, mode, 2), mode, 2)
        saved = {d: activation_memory(step, (1, 1, 32, 32, 32), d)["objective"]
                 for d in (torch.float16, torch.bfloat16)}
    assert "1 -> 2 channels; a training step on 1x1x32x32x32, fp16 autocast" in out
    assert saved[torch.float16] != saved[torch.bfloat16]
    line = next(line for line in out.splitlines() if line.strip().startswith("saved by the loss"))
    assert line.split()[4:6] == [f"{saved[torch.float16] / 2**20:.1f}", "MiB"], (line, saved)


def test_profile_searches_sides_in_the_networks_stride(monkeypatch, capsys):
    """A 7-level U-Net takes multiples of 64 (its divisor): the --max-memory search steps by 64, not by 32."""
    import fastseg3d.profile
    from fastseg3d.cli import main

    seen = []
    monkeypatch.setattr(fastseg3d.profile, "largest_cube", lambda *args, **kwargs: seen.append(kwargs) or 0)
    assert main(["profile", "--config", "dsd_unet", "--size", "128", "--batch", "1",
                 "model.kwargs.channels=[4,4,4,4,4,4,4]", "--max-memory", "1"]) == 0
    assert [(k["multiple"], k["start"]) for k in seen] == [(64, 64)]
    assert "fits 1 GiB: none" in capsys.readouterr().out


def test_bench_outside_a_clone_is_a_one_line_error(capsys, monkeypatch, tmp_path):
    """An installed fastseg3d has no bench/: exit 2 and what to do, not an ImportError."""
    from fastseg3d import cli

    (tmp_path / "fastseg3d").mkdir()
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "fastseg3d" / "cli.py"))
    assert cli.main(["bench", "ops"]) == 2
    assert "run from a clone of the repository" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    ([], "required: command"),
    (["profile", "--config", "quickstart", "--bogus=1"], "unrecognized arguments: --bogus=1"),
    (["profile", "--config", "quickstart", "data.batch_size=1", "--dtype", "fp32", "bogus"],
     "unrecognized arguments: bogus"),
    (["info", "a=1"], "unrecognized arguments: a=1"),
])
def test_usage_errors_exit_2(capsys, argv, message):
    """A missing subcommand, an option-like or bare word after the options, and overrides on a command that takes
    none: argparse's usage error (exit 2), not an override the config then rejects or a traceback."""
    from fastseg3d.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_every_command_reports_a_bad_environment_first(capsys, monkeypatch):
    """A bad FASTSEG3D_BACKEND is named before any command's own checks (here: eval's missing checkpoint)."""
    from fastseg3d import backends
    from fastseg3d.cli import main

    monkeypatch.setitem(backends._state, "backend", None)
    monkeypatch.setitem(backends._env_errors, "backend", "FASTSEG3D_BACKEND must be one of ('auto', 'triton', "
                                                         "'torch'), got 'bogus'")
    assert main(["eval", "--checkpoint", "missing.pt"]) == 2
    assert capsys.readouterr().err == "error: FASTSEG3D_BACKEND must be one of ('auto', 'triton', 'torch'), got " \
                                      "'bogus'\n"


def test_convert_exit_status_is_the_commands(capsys, tmp_path):
    """`fastseg3d convert` on a missing input ends with convert's status 1, not 0."""
    from fastseg3d.cli import main

    assert main(["convert", "--to", "official-segformer3d", str(tmp_path / "missing.pt"),
                 str(tmp_path / "out.pt")]) == 1
    assert "fastseg3d convert: error:" in capsys.readouterr().err


def test_the_command_line_shows_info_logs(monkeypatch):
    """The trainer's INFO lines (resuming from ..., activation checkpointing on N blocks) reach the console."""
    import logging

    from fastseg3d.cli import main

    calls = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: calls.append(kwargs))
    assert main(["info"]) == 0
    assert [c["level"] for c in calls] == [logging.INFO]
