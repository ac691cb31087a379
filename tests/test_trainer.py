"""Training loop: schedule, stages, exact resume, frozen weights, and a 2-process DDP run on CPU.

Everything runs the tiny preset on a 20-image synthetic dataset, on random base weights at
reduced image sizes, except one test on the committed miniature foundations.
"""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from prompt_ris.config import Config, ConfigError, load_config
from prompt_ris.data.loader import build_train_loader
from prompt_ris.data.prepare import prepare_refer
from prompt_ris.engine.trainer import (
    check_val_split,
    forward_loss,
    parameter_groups,
    poly_decay,
    resolve_mixed_precision,
    stage_of_epoch,
    train,
)
from prompt_ris.losses import Stage
from prompt_ris.miniature.synthetic import SYNTHETIC_DATASET, SYNTHETIC_SPLIT_BY, generate_synthetic
from prompt_ris.models import PromptRIS

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_synthetic.yaml"
SMALL = [  # the demo's config on random base weights at half its image sizes, 2 images x 2
    # expressions, 2 steps per epoch
    "model.clip.pretrained=null",
    "model.sam.checkpoint=null",
    "model.clip.image_size=64",
    "model.sam.image_size=128",
    "data.images_per_step=2",
    "data.expressions_per_image=2",
    "data.num_workers=0",
    "eval.batch_images=2",
    "train.stage1_epochs=1",
    "train.stage2_epochs=1",
    "train.max_steps_per_epoch=2",
    "train.log_every=1",
    "train.num_overlays=1",
]
SAM_SIDE = ("sam.", "text_prompter.")  # unused when with_sam=False


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 synthetic images (14 train, 2 val), prepared as the loaders read them."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, num_images=20, seed=0)
    prepare_refer(
        root, root / "prepared", [(SYNTHETIC_DATASET, SYNTHETIC_SPLIT_BY)], check_images="none"
    )
    return root / "prepared"


def small_cfg(prepared: Path, output_dir: Path, *overrides: str) -> Config:
    return load_config(
        CONFIG,
        [f"data.prepared={prepared}", f"train.output_dir={output_dir}", *SMALL, *overrides],
    )


def initial_model(cfg: Config) -> torch.nn.Module:
    """The weights ``train`` starts from (it builds the model right after ``set_seed``)."""
    set_seed(cfg.train.seed)
    return PromptRIS.from_config(cfg.model)


def read_losses(output_dir: Path) -> dict[int, dict[str, float]]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r for r in records if "loss/total" in r}
    assert len(losses) == sum("loss/total" in r for r in records), "a step was logged twice"
    return losses


# --------------------------------------------------------------------------------------------
# Schedule and settings
# --------------------------------------------------------------------------------------------
def test_the_text_prompter_can_have_its_own_lr(tiny_model: PromptRIS, tiny_cfg: Config) -> None:
    trained = [p for p in tiny_model.parameters() if p.requires_grad]
    (one,) = parameter_groups(tiny_model, tiny_cfg.train)
    assert one["params"] == trained and "lr" not in one  # the run's lr for all
    cfg = load_config(base=tiny_cfg, overrides=["train.lr=1e-3", "train.text_prompter_lr=5e-3"])
    rest, prompter = parameter_groups(tiny_model, cfg.train)
    assert [id(p) for p in prompter["params"]] == [
        id(p) for p in tiny_model.text_prompter.parameters()
    ]
    assert len(rest["params"]) + len(prompter["params"]) == len(trained)
    optimizer = torch.optim.AdamW([rest, prompter], lr=cfg.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_decay(10, 0.9))
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    lrs = [group["lr"] for group in optimizer.param_groups]  # both decay by the same schedule
    assert lrs == pytest.approx([1e-3 * 0.5**0.9, 5e-3 * 0.5**0.9])
    with pytest.raises(ConfigError, match="learning rate > 0"):
        load_config(overrides=["train.text_prompter_lr=0"])


def test_poly_decay_matches_the_formula_by_hand() -> None:
    factor = poly_decay(total_steps=10, power=0.9)
    assert factor(0) == 1.0
    assert factor(5) == pytest.approx(0.5**0.9)  # 0.535887
    assert factor(9) == pytest.approx(0.1**0.9)  # 0.125893
    assert factor(10) == 0.0 and factor(12) == 0.0
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.535887, rel=1e-5)


def test_stage_schedule_and_settings() -> None:
    cfg = load_config(overrides=["train.stage1_epochs=20", "train.stage2_epochs=30"])
    stages = [stage_of_epoch(e, cfg) for e in (0, 19, 20, 49)]
    assert stages == [Stage.COARSE, Stage.COARSE, Stage.FULL, Stage.FULL]
    assert [int(s) for s in Stage] == [1, 2]  # the numbers of train.stage1_epochs, stage2_epochs
    if not torch.cuda.is_available():
        assert resolve_mixed_precision("auto") == "no"
    assert resolve_mixed_precision("bf16") == "bf16"
    with pytest.raises(ConfigError, match="choose one of"):
        resolve_mixed_precision("fp32")


@pytest.mark.parametrize("name", ["refcoco:testA", "refcoco+:test_unseen", "synthetic:testB"])
def test_validation_refuses_test_splits(name: str) -> None:
    with pytest.raises(ConfigError, match="must not see test data"):
        check_val_split(name)
    check_val_split("refcocog:val_seen")


# --------------------------------------------------------------------------------------------
# Learning
# --------------------------------------------------------------------------------------------
def test_losses_decrease_on_a_fixed_batch(prepared: Path, tmp_path: Path) -> None:
    """On the committed miniature foundations, frozen (the paper's setting, the demo's sizes):
    the learned parts alone bring both stages' losses down, SAM's included."""
    foundations = ROOT / "checkpoints" / "tiny_synthetic"
    cfg = small_cfg(
        prepared, tmp_path, "model.clip.image_size=128", "model.sam.image_size=256",
        f"model.clip.pretrained={foundations / 'clip_tiny_synthetic.pt'}",
        f"model.sam.checkpoint={foundations / 'sam_tiny_synthetic.pth'}",
    )  # fmt: skip
    batch = next(iter(build_train_loader(cfg)))
    model = initial_model(cfg).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    history: dict[Stage, list[dict[str, float]]] = {Stage.COARSE: [], Stage.FULL: []}
    for stage, steps in ((Stage.COARSE, 8), (Stage.FULL, 12)):
        for step in range(steps):
            torch.manual_seed(step)
            loss, terms = forward_loss(model, batch, stage, cfg.train)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            history[stage].append(terms)
    coarse, full = history[Stage.COARSE], history[Stage.FULL]
    assert "samseg" not in coarse[0] and "samseg" in full[0]  # stage 1 has no SAM loss
    assert sum(t["total"] for t in coarse[-3:]) / 3 < 0.6 * coarse[0]["total"], coarse
    assert sum(t["total"] for t in full[-3:]) / 3 < 0.85 * full[0]["total"], full
    assert full[-1]["samseg"] < 0.9 * full[0]["samseg"], full  # the SAM path learns in stage 2


def test_stage1_leaves_sam_alone_stage2_trains_it_and_frozen_weights_stay(
    prepared: Path, tmp_path: Path
) -> None:
    frozen = [
        "model.clip.freeze=true",
        "model.sam.freeze_image_encoder=true",
        "model.sam.freeze_prompt_encoder=true",
        "model.sam.freeze_mask_decoder=true",
    ]
    cfg = small_cfg(prepared, tmp_path, "train.max_steps_per_epoch=1", "train.val_every=0", *frozen)
    init = dict(initial_model(cfg).named_parameters())
    result = train(cfg)

    trained = dict(result.model.named_parameters())
    for name, param in trained.items():
        if not param.requires_grad:  # frozen CLIP and SAM: bit-identical after both stages
            assert torch.equal(param, init[name]), name
    stage1 = load_file(str(tmp_path / "stage1" / "model.safetensors"))
    final = load_file(str(tmp_path / "final" / "model.safetensors"))
    learned = [n for n, p in trained.items() if p.requires_grad]
    sam_side = [n for n in learned if n.startswith(SAM_SIDE)]
    clip_side = [n for n in learned if not n.startswith(SAM_SIDE)]
    assert sam_side and clip_side
    for name in sam_side:  # stage 1 did not touch the SAM side ...
        assert torch.equal(stage1[name], init[name].detach()), name
    assert any(not torch.equal(stage1[n], init[n].detach()) for n in clip_side)  # ... but CLIP's
    changed = [n for n in sam_side if not torch.equal(final[n], stage1[n])]
    assert any(n.startswith("text_prompter.") for n in changed)  # stage 2 trains it
    for name in learned:
        assert torch.equal(final[name], trained[name].detach()), name


def test_stage2_with_sam_embedding_cache_fills_it_and_matches_uncached_losses(
    prepared: Path, tmp_path: Path
) -> None:
    frozen_encoder = ["model.sam.freeze_image_encoder=true", "train.val_every=0"]
    steps = ["train.max_steps_per_epoch=2", "train.stage1_epochs=0", "train.stage2_epochs=2"]
    plain = small_cfg(prepared, tmp_path / "plain", *frozen_encoder, *steps)
    train(plain)
    cache_dir = tmp_path / "cache"
    cached = small_cfg(
        prepared, tmp_path / "cached", *frozen_encoder, *steps, f"train.sam_embed_cache={cache_dir}"
    )
    train(cached)
    files = list(cache_dir.rglob("*.safetensors"))
    assert files, "stage 2 wrote no cached SAM embedding"
    want, got = read_losses(tmp_path / "plain"), read_losses(tmp_path / "cached")
    assert want.keys() == got.keys()
    for step in want:  # the cache stores fp16 embeddings: equal up to that rounding
        assert got[step]["loss/total"] == pytest.approx(want[step]["loss/total"], rel=2e-2)


def test_sam_embedding_cache_refuses_a_trainable_encoder(prepared: Path, tmp_path: Path) -> None:
    cfg = small_cfg(
        prepared, tmp_path, "model.sam.freeze_image_encoder=false",
        f"train.sam_embed_cache={tmp_path / 'cache'}",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="freeze_image_encoder"):
        train(cfg)


# --------------------------------------------------------------------------------------------
# Checkpoints and resume
# --------------------------------------------------------------------------------------------
def test_resume_after_interruption_reproduces_losses_and_weights(
    prepared: Path, tmp_path: Path
) -> None:
    straight = tmp_path / "straight"
    train(small_cfg(prepared, straight))
    # The default tracker: TensorBoard events (scalars and overlays) under tensorboard/.
    assert list((straight / "tensorboard" / "prompt-ris").glob("events.out.tfevents.*"))

    cut = tmp_path / "interrupted"
    cli = runpy.run_path(str(ROOT / "scripts" / "train.py"))["main"]
    args = ["--config", str(CONFIG), f"data.prepared={prepared}", f"train.output_dir={cut}", *SMALL]
    # Stop in the middle of stage 1 (the resume skips the batches already done) ...
    first = cli([*args, "train.stop_at_step=1"])
    assert not first.finished and first.global_step == 1
    # ... resume, and stop one step into stage 2 after having saved every step.
    cli([*args, "train.stop_at_step=3", "--save-every-steps", "1", "--resume"])
    # A process killed right after step 3 leaves step 3 logged but the latest checkpoint at an
    # earlier step: resume from the end of stage 1, which logs step 3 again.
    checkpoint = cut / "checkpoints" / "step_00000002"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step_in_epoch"] == 0
    last = cli([*args, "--resume", str(checkpoint)])
    assert last.finished and last.global_step == 4

    expected, got = read_losses(straight), read_losses(cut)
    assert sorted(got) == [1, 2, 3, 4] and expected.keys() == got.keys()
    for step in expected:
        for key in ("loss/total", "loss/clipseg", "loss/icl_coarse", "lr"):
            assert got[step][key] == expected[step][key], (step, key)
    assert got[4]["loss/samseg"] == expected[4]["loss/samseg"]
    for export in ("stage1", "best", "final"):
        a = load_file(str(straight / export / "model.safetensors"))
        b = load_file(str(cut / export / "model.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), export


def test_resuming_a_finished_run_does_nothing_and_says_so(
    prepared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    cli = runpy.run_path(str(ROOT / "scripts" / "train.py"))["main"]
    args = ["--config", str(CONFIG), f"data.prepared={prepared}", f"train.output_dir={run}", *SMALL,
            "train.stage2_epochs=0", "train.max_steps_per_epoch=1", "train.val_every=0",
            "train.tracker=none"]  # fmt: skip
    first = cli(args)
    assert first.finished and first.global_step == 1
    written = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()}
    with caplog.at_level("INFO"):
        again = cli(["--resume", str(run)])
    assert again.finished and again.global_step == 1
    assert f"run '{run}' already finished at step 1; nothing to do" in caplog.text
    now = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()}
    assert now == written  # final/ not exported again, nothing else rewritten
    final = load_file(str(run / "final" / "model.safetensors"))
    state = again.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in final.items())


# --------------------------------------------------------------------------------------------
# Several processes
# --------------------------------------------------------------------------------------------
DRIVER = """
import hashlib, runpy, sys
from pathlib import Path
from accelerate import PartialState

main = runpy.run_path(sys.argv[1])["main"]
result = main(sys.argv[3:])
digest = hashlib.sha256()
for name, tensor in sorted(result.model.state_dict().items()):
    digest.update(name.encode() + tensor.detach().float().cpu().contiguous().numpy().tobytes())
rank = PartialState().process_index
Path(sys.argv[2], f"rank{rank}.txt").write_text(f"{result.global_step} {digest.hexdigest()}")
"""


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode() + tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_two_process_ddp_run_on_cpu_keeps_processes_identical(
    prepared: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    overrides = [  # 2 processes x 2 images x 2 accumulated micro-batches per step
        *SMALL, "train.max_steps_per_epoch=1", "data.images_per_step=8",
        "data.images_per_process=2",
    ]  # fmt: skip
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(driver), str(ROOT / "scripts" / "train.py"), str(tmp_path),
        "--config", str(CONFIG), f"data.prepared={prepared}", f"train.output_dir={out}", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    ranks = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0][0] == "2"  # same step count and the same weights
    assert "2 process(es)" in proc.stderr
    # Stage 1 under DDP did not move the SAM side (no gradient on any process, so no update).
    cfg = small_cfg(prepared, out, *overrides)
    init = initial_model(cfg).state_dict()
    stage1 = load_file(str(out / "stage1" / "model.safetensors"))
    final = load_file(str(out / "final" / "model.safetensors"))
    sam_side = [n for n in stage1 if n.startswith(SAM_SIDE)]
    assert sam_side and all(torch.equal(stage1[n], init[n]) for n in sam_side)
    assert any(not torch.equal(final[n], stage1[n]) for n in sam_side)
    # The export is rank 0's model, which equals rank 1's.
    exported = {**init, **final}
    assert _digest(exported) == ranks[0][1]


# --------------------------------------------------------------------------------------------
# Launcher choices, throughput, trackers, checks before the wait
# --------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    """Accelerate keeps one process-wide state; tests that change its precision reset it with
    accelerate's private ``AcceleratorState._reset_state``, as accelerate's own tests do (there is
    no public reset)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize(
    ("setting", "launcher", "expected", "warns"),
    [
        ("auto", "bf16", "bf16", False),  # accelerate launch --mixed_precision bf16
        ("auto", "no", "no", False),
        ("no", "bf16", "no", True),  # the config overrides the launcher, and says so
        ("bf16", None, "bf16", False),
    ],
)
def test_mixed_precision_follows_the_launcher_unless_the_config_sets_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fresh_accelerate_state: None,
    setting: str, launcher: str | None, expected: str, warns: bool,
) -> None:  # fmt: skip
    from prompt_ris.engine.trainer import build_accelerator

    if launcher is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)  # what accelerate launch sets
    cfg = load_config(overrides=[f"train.mixed_precision={setting}", "train.tracker=none"])
    with caplog.at_level("WARNING"):
        accelerator = build_accelerator(cfg)
    assert accelerator.mixed_precision == expected
    assert ("overrides accelerate launch" in caplog.text) is warns


@pytest.mark.parametrize(
    ("setting", "launcher", "expected"),
    [("null", "INDUCTOR", "INDUCTOR"), ("null", None, "NO"), ("false", "INDUCTOR", "NO"),
     ("true", None, "INDUCTOR")],
)  # fmt: skip
def test_compile_follows_the_launchers_dynamo_backend_unless_set(
    monkeypatch: pytest.MonkeyPatch, fresh_accelerate_state: None,
    setting: str, launcher: str | None, expected: str,
) -> None:  # fmt: skip
    from prompt_ris.engine.trainer import build_accelerator

    if launcher is None:
        monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", launcher)  # accelerate launch's
    cfg = load_config(overrides=[f"train.compile={setting}", "train.tracker=none"])
    assert build_accelerator(cfg).state.dynamo_plugin.backend.value == expected


def test_fp16_on_cpu_is_refused_before_anything_is_built(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    fresh_accelerate_state: None, prepared: Path, tmp_path: Path,
) -> None:  # fmt: skip
    """accelerate runs fp16 in float32 on CPU (no autocast) while reporting fp16: refused, from
    the launcher or from the config, in one line with the fix."""
    from prompt_ris.engine import trainer

    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # accelerate launch --cpu
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # accelerate launch's value
    with pytest.raises(ConfigError, match="launch with --mixed_precision bf16 or no$"):
        resolve_mixed_precision("auto")
    assert resolve_mixed_precision("no") == "no"  # the config overrides the launcher
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    with pytest.raises(ConfigError, match="set train.mixed_precision to bf16, no or auto$"):
        resolve_mixed_precision("fp16")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built before the checks")

    monkeypatch.setattr(trainer.PromptRIS, "from_config", refuse)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    cli = runpy.run_path(str(ROOT / "scripts" / "train.py"))["main"]
    argv = ["--config", str(CONFIG), f"data.prepared={prepared}", *SMALL,
            f"train.output_dir={tmp_path / 'run'}", "train.tracker=none"]  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        cli(argv)
    assert stop.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "train.py: error: accelerate launch's mixed precision fp16 (--mixed_precision or "
        "accelerate config) would run in float32 on CPU: accelerate turns fp16 autocast on only "
        "on a GPU; launch with --mixed_precision bf16 or no",
        "train.py: 1 problem(s) found before building the model",
    ]


@pytest.mark.parametrize(
    ("precision", "backend", "applied"),
    [
        ("bf16", "INDUCTOR", "mixed precision bf16 (autocast to bfloat16); torch.compile with "
                             "dynamo backend inductor (mode default); "),
        ("no", "NO", "mixed precision no (float32); no torch.compile (dynamo backend no); "),
    ],
)  # fmt: skip
def test_the_log_states_the_launch_as_applied(
    monkeypatch: pytest.MonkeyPatch, fresh_accelerate_state: None,
    precision: str, backend: str, applied: str,
) -> None:  # fmt: skip
    """Read back from the prepared model: the dtype autocast runs in, torch.compile and its
    backend, the processes and the batch split."""
    from prompt_ris.data.schedule import plan_steps
    from prompt_ris.engine.trainer import build_accelerator, describe_launch

    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", precision)  # accelerate launch's
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", backend)
    cfg = load_config(overrides=["train.tracker=none"])
    accelerator = build_accelerator(cfg)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    assert describe_launch(accelerator, model, plan_steps(cfg.data, 1)) == (
        f"1 process(es) on cpu; {applied}16 images x 4 expressions per optimizer step = "
        "1 process(es) x 16 images per micro-batch x 1 accumulated"
    )


def test_a_launch_asked_for_several_processes_that_started_one_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``accelerate launch --cpu --num_processes 3`` runs the script once."""
    from prompt_ris.engine.trainer import single_process_warning

    driver = tmp_path / "driver.py"
    driver.write_text(
        "from accelerate import PartialState\n"
        "from prompt_ris.engine.trainer import single_process_warning\n"
        "n = PartialState(cpu=True).num_processes\n"
        "print(n, single_process_warning(n))\n"
    )
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "3",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(driver),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("1 accelerate launch was asked for more than")
    assert "launch with --multi_gpu --num_processes N and without --cpu" in lines[0]
    # One process asked for, or several started: nothing to say.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert single_process_warning(1) is None
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert single_process_warning(2) is None


def test_throughput_counts_training_time_across_epochs_and_validations(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fake clock that moves 1 s per training micro-step and 1000 s per validation: every
    logged throughput must be the expressions of one micro-step per second, exactly."""
    from prompt_ris.engine import tracking, trainer

    clock = [0.0]
    monkeypatch.setattr(tracking, "_clock", lambda: clock[0])
    real_forward, real_validate = trainer.forward_loss, trainer.validate

    def forward(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        clock[0] += 1.0
        return real_forward(*args, **kwargs)

    def validate(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        clock[0] += 1000.0
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(trainer, "forward_loss", forward)
    monkeypatch.setattr(trainer, "validate", validate)
    cfg = small_cfg(
        prepared, tmp_path, "train.stage1_epochs=2", "train.stage2_epochs=1",
        "train.log_every=3", "train.tracker=none",
    )  # fmt: skip
    train(cfg)
    losses = read_losses(tmp_path)
    assert sorted(losses) == [3, 6]  # each log spans an epoch boundary and a validation
    per_step = cfg.data.images_per_step * cfg.data.expressions_per_image  # 1 process, 1 micro-batch
    for step, record in losses.items():
        assert record["expressions_per_s"] == pytest.approx(per_step), step
    assert not (tmp_path / "tensorboard").exists()  # train.tracker=none, overlays skipped


def test_train_script_reports_every_problem_before_building_anything(
    prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from prompt_ris.engine import trainer

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built before the checks")

    monkeypatch.setattr(trainer.PromptRIS, "from_config", refuse)
    cli = runpy.run_path(str(ROOT / "scripts" / "train.py"))["main"]
    argv = [
        "--config", str(CONFIG), f"train.output_dir={tmp_path / 'run'}",
        f"data.prepared={tmp_path / 'nothing'}", "train.lrr=1", "data.val=synthetic:testA",
        "model.sam.checkpoint=sam_vit_b_01ec64.pth", "train.tracker=tensorbord",
        "train.text_grounding_weight=1", "model.prompts.switches=mask + point", "--resume",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        cli(argv)
    assert stop.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("train.py: ") for line in lines), lines
    text = "\n".join(lines)
    for fragment in (
        "unknown config key 'train.lrr'; did you mean 'train.lr'?",
        "data.val='synthetic:testA' is a test split",
        "train.tracker='tensorbord' is unknown",
        "model.sam.checkpoint='sam_vit_b_01ec64.pth' not found in the weights folder",
        "prepared data for synthetic(unc) not found",
        "--resume latest: no checkpoint found",
        "train.text_grounding_weight=1 teaches the text prompter, but "
        "model.prompts.switches='mask + point' has no text",
    ):
        assert fragment in text, (fragment, text)
    assert lines[-1] == "train.py: 7 problem(s) found before building the model"

    # A folder that already holds a run is not trained over without --resume.
    monkeypatch.undo()
    run = tmp_path / "run2"
    args = ["--config", str(CONFIG), f"data.prepared={prepared}", f"train.output_dir={run}", *SMALL]
    assert not cli([*args, "train.stop_at_step=1", "train.tracker=none"]).finished
    with pytest.raises(SystemExit):
        cli([*args, "train.tracker=none"])
    assert f"continue it with --resume {run}" in capsys.readouterr().err
