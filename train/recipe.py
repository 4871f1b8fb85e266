"""``python -m train``: the paper's training recipe (section 3.1) on an ImageFolder tree.

    python -m train --data DIR --arch vgg16 --scale 256:512              # one device
    torchrun --nproc-per-node 8 -m train --data DIR --arch vgg16         # 8 GPUs, same result
    python -m train --data DIR --arch vgg16_bn --width 0.125 --fc-width 256 --crop 64 \\
        --scale 64:128 --init kaiming                                    # a small CPU variant

The same from Python, in the shape of torchvision's ``references/classification/train.py``:
:func:`train` runs a whole training from a :class:`train.config.TrainConfig` (one process, or
one of torchrun's); it builds a :class:`Training` (:func:`setup`), then calls
:func:`train_one_epoch` and, at validation epochs, :func:`validate` until the schedule or the
epoch count ends the run; :func:`final_evaluation` measures the best weights on every
validation image. Checkpoints are saved and resumed by :mod:`train.checkpoints`.

Every random draw is a function of ``--seed`` and the position in training (see
``train.data`` and ``train.layers``), so a run resumed from any checkpoint, or split over any
number of processes, takes the same steps as one uninterrupted process.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from inference.cores import available_cores
from inference.protocol import ScalePosteriors
from train import distributed
from train.augment import TrainAugmentation
from train.checkpoints import (
    BEST,
    LAST,
    Progress,
    RunState,
    atomic_save,
    best_checkpoint,
    last_checkpoint,
    read_last,
    restore_model,
    restore_training,
    run_state,
)
from train.config import TrainConfig
from train.data import DataError, EpochBatches, Folder, TrainSet, load_rgb, scan_folder
from train.evaluate import collect, error_rates, serving_graph
from train.initialise import init_from, initialise
from train.layers import StepClock, convert_sync_batchnorm, use_batch_dropout
from train.normalisation import Normalisation, dataset_statistics
from train.options import parse_args
from train.reporting import epoch_line, log, plot_curves, write_metrics
from train.schedule import LearningRate
from vgg.checkpoint import CheckpointError, check_state_dict, load_weights
from vgg.models import VGG, resolve_arch

FINAL_FILE = "final.json"
POSTERIORS_FILE = "posteriors.npz"
_VAL_SALT = 19


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived; the run saved its state and stopped (rerun to continue)."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by this signal: 128 + its number."""
        return 128 + self.signum


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag checked between steps."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.received = signum

    def restore(self) -> None:
        """Put back the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _ignore_stop_signals(_worker_id: int) -> None:
    # Ctrl-C and `timeout` signal the whole process group: loader workers must live on until
    # the main process has finished its step and saved.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def validate(
    model: VGG,
    norm: Normalisation,
    folder: Folder,
    indices: list[int],
    single: int,
    scales: tuple[int, ...],
    flip: bool,
    proc: distributed.Process,
) -> tuple[dict, dict]:
    """Dense-protocol errors at Q=``single`` and over ``scales``; this process takes a shard.

    Returns (metrics, per-scale posteriors of all images in ``indices`` order).
    """
    mine = indices[proc.rank :: proc.world]
    graph = serving_graph(model, norm.mean, norm.std, proc.device)
    images = [load_rgb(folder.samples[i][0]) for i in mine]
    all_scales = tuple(sorted({single, *scales}))
    posteriors = collect(graph, images, all_scales, model.spec.crop, "dense", flip, proc.device)
    shards = [(mine, posteriors.dense)]
    if proc.world > 1:
        shards = distributed.gather_objects(shards[0])
    order = {index: n for n, index in enumerate(indices)}
    num_classes = model.spec.num_classes
    dense = {q: np.zeros((len(indices), num_classes)) for q in all_scales}
    for shard_indices, shard in shards:
        rows = [order[i] for i in shard_indices]
        for q in all_scales:
            if len(rows):
                dense[q][rows] = shard[q]
    labels = np.array([folder.samples[i][1] for i in indices])
    top1, top5 = error_rates(dense[single], labels)
    multi = ScalePosteriors(dense=dense).combine(scales)  # the server's fusion over scales
    multi1, multi5 = error_rates(multi, labels)
    metrics = {
        "val_scale": single,
        "val_top1_err": top1,
        "val_top5_err": top5,
        "val_scales": list(scales),
        "val_multi_top1_err": multi1,
        "val_multi_top5_err": multi5,
        "val_images": len(indices),
        "val_per_scale": {str(q): list(error_rates(dense[q], labels)) for q in all_scales},
    }
    return metrics, {"labels": labels, **{f"Q{q}": p for q, p in dense.items()}}


@dataclass
class TrainResult:
    """What a finished :func:`train` leaves: its folder, its learning curves, its final score."""

    output_dir: Path
    epochs: int  # completed epochs
    history: list[dict]
    # final.json: the best weights on every validation image (main process only, else None)
    final: dict | None


@dataclass
class Training:
    """Everything one process holds while it trains, built by :func:`setup`."""

    config: TrainConfig
    process: distributed.Process
    classes: tuple[str, ...]
    val_folder: Folder
    val_indices: list[int]
    norm: Normalisation
    model: VGG  # the net itself, whose weights are saved
    net: torch.nn.Module  # what the steps run: ``model``, or its DistributedDataParallel
    optimizer: torch.optim.Optimizer
    schedule: LearningRate
    clock: StepClock
    sampler: EpochBatches
    loader: DataLoader
    state: RunState
    # The served graph's normalisation, x * scale + shift, on the device.
    pixel_scale: torch.Tensor
    pixel_shift: torch.Tensor

    @property
    def last_path(self) -> Path:
        """``last.pth`` of this run."""
        return self.config.output_dir / LAST


def scan_data(config: TrainConfig) -> tuple[Folder, Folder]:
    """The training and validation folders (validation classes must be training classes)."""
    train_folder = scan_folder(config.data / "train")
    val_folder = scan_folder(config.data / "val", train_folder.classes)
    return train_folder, val_folder


def build_model(
    config: TrainConfig, train_folder: Folder, saved: dict | None, process: distributed.Process
) -> tuple[VGG, Normalisation, RunState]:
    """The net, in the state ``saved`` left it or initialised by the recipe, and its
    normalisation; the seeded draws happen here, always in the same order."""
    classes = train_folder.classes
    spec = resolve_arch(
        config.arch,
        width=config.width,
        fc_width=config.fc_width,
        crop=config.crop,
        num_classes=len(classes),
        dropout=config.dropout,
    )
    torch.manual_seed(config.seed)
    model = VGG(spec)
    if saved is not None:
        last_path = config.output_dir / LAST
        restore_model(model, saved, spec, classes, last_path)
        norm = Normalisation.from_dict(saved["normalisation"], config.lighting)
        state = run_state(saved)
        if process.main:
            log(f"resuming {config.output_dir} at epoch {state.epoch + 1}, step {state.step}")
        return model, norm, state
    norm = dataset_statistics(
        train_folder, config.stats_images, config.seed, config.normalize, config.lighting
    )
    initialise(model, config.init)
    if config.init_from:
        source = load_weights(config.init_from, config.init_from_arch)
        copied = init_from(model, source.model)
        if process.main:
            log(f"initialised {', '.join(copied)} from {config.init_from}")
    if config.finetune_from:
        source = load_weights(config.finetune_from, config.arch)
        check_state_dict(model, source.model.state_dict(), str(config.finetune_from))
        model.load_state_dict(source.model.state_dict())
        # The weights expect the normalisation they were trained with.
        norm = Normalisation(source.mean, source.std, norm.lighting)
        if process.main:
            log(f"fine-tuning from {config.finetune_from}")
    return model, norm, RunState()


def validation_subset(config: TrainConfig, val_folder: Folder) -> list[int]:
    """The validation images of every epoch: all, or a fixed random ``val_images`` of them."""
    val_rng = np.random.default_rng([config.seed, _VAL_SALT])
    val_indices = list(range(len(val_folder)))
    if config.val_images and config.val_images < len(val_folder):
        val_indices = sorted(
            val_rng.choice(len(val_folder), config.val_images, replace=False).tolist()
        )
    return val_indices


def setup(config: TrainConfig, process: distributed.Process, saved: dict | None) -> Training:
    """Data, net, optimiser, schedule and loader of a run, fresh or resumed from ``saved``."""
    train_folder, val_folder = scan_data(config)
    model, norm, state = build_model(config, train_folder, saved, process)
    spec = model.spec

    clock = StepClock(global_batch=config.batch_size)
    use_batch_dropout(model, clock)
    device = process.device
    on_gpu = device.type == "cuda"
    model.to(device)
    if on_gpu and config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if process.world > 1 and spec.batch_norm and config.sync_bn:
        model = convert_sync_batchnorm(model, device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    schedule = LearningRate(
        kind=config.lr_scheduler,
        base_lr=config.lr,
        epochs=config.epochs,
        warmup_epochs=config.warmup_epochs,
        factor=config.lr_factor,
        patience=config.lr_patience,
        max_drops=config.lr_drops,
        step_size=config.lr_step_size,
    )
    if saved is not None:
        restore_training(saved, optimizer, schedule)
    net = model
    if process.world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if on_gpu else None)

    smin, smax = config.scale
    augmentation = TrainAugmentation(smin, smax, spec.crop, config.flip, norm.lighting)
    dataset = TrainSet(train_folder, augmentation, config.seed)
    sampler = EpochBatches(
        len(dataset), config.batch_size, config.seed, process.rank, process.world
    )
    workers = config.workers if config.workers is not None else (8 if on_gpu else 1)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=on_gpu,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_ignore_stop_signals,
    )
    std = torch.tensor(norm.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    mean = torch.tensor(norm.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    val_indices = validation_subset(config, val_folder)

    if process.main:
        log(
            f"{spec.arch} (width {spec.width}, FC {spec.fc_width}, crop {spec.crop}, "
            f"{len(train_folder.classes)} classes) on {len(train_folder)} training / "
            f"{len(val_folder)} validation images; {process.world} process(es) on "
            f"{device.type}, {torch.get_num_threads()} threads, {workers} loader workers; "
            f"S={smin}"
            + (f":{smax}" if smax != smin else "")
            + f", batch {config.batch_size}, {sampler.steps_per_epoch} steps/epoch"
        )
    return Training(
        config=config,
        process=process,
        classes=train_folder.classes,
        val_folder=val_folder,
        val_indices=val_indices,
        norm=norm,
        model=model,
        net=net,
        optimizer=optimizer,
        schedule=schedule,
        clock=clock,
        sampler=sampler,
        loader=loader,
        state=state,
        pixel_scale=1.0 / (255.0 * std),
        pixel_shift=-mean / std,
    )


def save_last(training: Training) -> None:
    """Write ``last.pth`` (main process only) where the run is now."""
    if not training.process.main:
        return
    checkpoint = last_checkpoint(
        training.model,
        training.classes,
        training.norm,
        training.state,
        training.optimizer,
        training.schedule,
        training.config.as_record(),
        training.process.world,
    )
    atomic_save(checkpoint, training.last_path)


def train_step(
    training: Training, pixels: torch.Tensor, shift: torch.Tensor, labels: torch.Tensor, lr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step at learning rate ``lr`` on a uint8 batch and its colour shifts.

    Returns the batch's mean loss (detached) and its number of correct answers, on the device.
    """
    config, device = training.config, training.process.device
    on_gpu = device.type == "cuda"
    for group in training.optimizer.param_groups:
        group["lr"] = lr
    x = pixels.to(device, non_blocking=True).float()
    x = (
        x + shift.to(device, non_blocking=True)[:, :, None, None]
    ) * training.pixel_scale + training.pixel_shift
    if on_gpu and config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = labels.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu and config.amp):
        logits = training.net(x)
    loss = F.cross_entropy(logits.float(), labels)
    training.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    training.optimizer.step()
    with torch.no_grad():
        return loss.detach(), (logits.argmax(1) == labels).sum()


def train_one_epoch(training: Training, stop: StopSignal, show_progress: bool = False) -> dict:
    """The rest of the current epoch, from the step ``training.state`` is at.

    Returns the epoch's training row of the history (loss, error, learning rate, speed).
    Saves ``last.pth`` every ``save_every_steps`` steps, and raises :class:`Interrupted`
    after saving when ``stop`` has seen a signal on any process.
    """
    config, state, process = training.config, training.state, training.process
    device = process.device
    sampler, schedule = training.sampler, training.schedule
    epoch = state.epoch
    sampler.set_epoch(epoch, state.step)
    training.net.train()
    started = time.perf_counter()
    # loss * n and correct answers, summed on the device and read once per epoch
    totals_t = torch.zeros(2, dtype=torch.float64, device=device)
    steps = sampler.steps_per_epoch
    bar = None
    if show_progress and process.main:
        from tqdm import tqdm

        bar = tqdm(
            total=steps,
            initial=state.step,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            leave=False,
            dynamic_ncols=True,
        )
    for pixels, shift, labels in training.loader:
        step = state.step
        lr = schedule.at(epoch, step, steps)
        # Dropout masks are a function of the seed and the position in training.
        training.clock.key = (config.seed, epoch, step)
        training.clock.offset = process.rank * sampler.local_batch
        loss, correct = train_step(training, pixels, shift, labels, lr)
        totals_t[0] += loss.double() * len(labels)
        totals_t[1] += correct
        state.step += 1
        if bar is not None:
            bar.update(1)
            if state.step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")
        interrupted = stop.received is not None
        if process.world > 1:
            interrupted = distributed.any_process(interrupted)
        periodic = config.save_every_steps and state.step % config.save_every_steps == 0
        if (interrupted or periodic) and state.step < steps:
            partial = totals_t.tolist()
            totals_t.zero_()
            state.progress.loss += partial[0]
            state.progress.correct += partial[1]
            state.progress.seconds += time.perf_counter() - started
            started = time.perf_counter()
            save_last(training)
            if interrupted:
                signum = int(stop.received or signal.SIGTERM)
                raise Interrupted(
                    signum,
                    f"stopped by signal {stop.received}: saved {training.last_path} at epoch "
                    f"{state.epoch + 1}, step {state.step}",
                )
    if bar is not None:
        bar.close()
    totals = totals_t.tolist()
    progress = state.progress
    local = [progress.loss + totals[0], progress.correct + totals[1]]
    seconds = progress.seconds + time.perf_counter() - started
    loss_sum, correct = distributed.sum_all(local)
    seen = steps * config.batch_size
    return {
        "epoch": epoch + 1,
        "lr": schedule.at(epoch, steps - 1, steps),
        "train_loss": loss_sum / seen,
        "train_top1_err": 100.0 * (1 - correct / seen),
        "images_per_s": seen / max(seconds, 1e-9),
        "epoch_s": seconds,
    }


def validate_epoch(training: Training) -> dict:
    """Validate the current weights; update the schedule, ``best.pth`` and ``final.json``.

    Returns the validation part of the epoch's history row.
    """
    config, state, process = training.config, training.state, training.process
    epoch = state.epoch
    val_started = time.perf_counter()
    metrics, posteriors = validate(
        training.model,
        training.norm,
        training.val_folder,
        training.val_indices,
        config.val_scale,
        config.val_scales,
        config.val_flip,
        process,
    )
    row = {**metrics, "val_s": time.perf_counter() - val_started}
    if training.schedule.observe(metrics["val_multi_top1_err"]):
        state.finished = True
        row["stopped"] = f"no improvement after {training.schedule.drops} learning-rate drops"
    if state.best is None or metrics["val_multi_top1_err"] < state.best["val_multi_top1_err"]:
        state.best = {
            "epoch": epoch + 1,
            **{k: metrics[k] for k in ("val_multi_top1_err", "val_images")},
        }
        if process.main:
            best = best_checkpoint(
                training.model, training.classes, training.norm, epoch + 1, metrics
            )
            atomic_save(best, config.output_dir / BEST)
            if metrics["val_images"] == len(training.val_folder):
                _write_final(config.output_dir, metrics, posteriors, epoch + 1)
    return row


def finish_epoch(training: Training, row: dict) -> None:
    """Record the epoch's row, move to the next epoch, save ``last.pth`` and report."""
    config, state = training.config, training.state
    state.history.append(row)
    state.epoch, state.step, state.progress = state.epoch + 1, 0, Progress()
    state.finished = state.finished or state.epoch >= config.epochs
    save_last(training)
    if training.process.main:
        spec = training.model.spec
        write_metrics(config.output_dir, state.history)
        plot_curves(
            config.output_dir, state.history, f"{spec.arch} width {spec.width} on {config.data}"
        )
        log(epoch_line(row, config.epochs))


def _validates_after(config: TrainConfig, epoch: int) -> bool:
    """Whether the epoch numbered ``epoch`` (from 1) ends with a validation."""
    return bool(config.val_every and epoch % config.val_every == 0) or epoch == config.epochs


def train(config: TrainConfig, process: distributed.Process | None = None) -> TrainResult:
    """Run (or continue) a whole training as ``config`` says; this process's part under torchrun.

    Without ``process`` this joins the process group torchrun describes (if any) and leaves it
    at the end. Rerunning with the same ``config`` continues from ``output_dir/last.pth``, and
    a finished run only reports. Raises :class:`Interrupted` after saving when SIGTERM or
    SIGINT arrives; :class:`train.data.DataError`, :class:`vgg.checkpoint.CheckpointError` or
    ``ValueError`` (:class:`train.config.ConfigError` among them) for input it cannot use.
    """
    config = config.resolved()
    if process is None:
        process = distributed.start(config.device)
        try:
            return train(config, process)
        finally:
            distributed.stop()
    cores = available_cores()
    torch.set_num_threads(config.threads or max(1, cores // max(1, process.local_world)))
    out = config.output_dir
    if process.main:
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()

    saved = read_last(out, config.resume)
    if saved is not None and saved.get("finished"):
        if process.main:
            log(f"{out}: training already finished at epoch {saved['epoch']}; nothing to do")
        final = final_evaluation(config, process)
        return TrainResult(out, saved["epoch"], list(saved["history"]), final)

    training = setup(config, process, saved)
    state = training.state
    stop = StopSignal()
    show_progress = config.progress if config.progress is not None else sys.stderr.isatty()
    try:
        while state.epoch < config.epochs and not state.finished:
            row = train_one_epoch(training, stop, show_progress)
            if _validates_after(config, state.epoch + 1):
                row.update(validate_epoch(training))
            finish_epoch(training, row)
    finally:
        stop.restore()
    final = final_evaluation(config, process)
    return TrainResult(out, state.epoch, state.history, final)


def _write_final(out: Path, metrics: dict, posteriors: dict, epoch: int) -> None:
    result = {"epoch": epoch, **{k: v for k, v in metrics.items()}}
    (out / FINAL_FILE).write_text(json.dumps(result, indent=2) + "\n")
    np.savez(out / POSTERIORS_FILE, **posteriors)


def final_evaluation(config: TrainConfig, process: distributed.Process) -> dict | None:
    """The best weights on every validation image, unless that was already measured.

    Runs on the main process alone (the others wait), so it needs no shared file system.
    Returns the contents of ``final.json`` on the main process, None on the others.
    """
    out = config.output_dir
    if process.main and not (out / FINAL_FILE).is_file() and (out / BEST).is_file():
        best = load_weights(out / BEST)
        _, val_folder = scan_data(config)
        alone = distributed.Process(0, 1, 0, 1, process.device)
        metrics, posteriors = validate(
            best.model.to(process.device),
            Normalisation(best.mean, best.std, None),
            val_folder,
            list(range(len(val_folder))),
            config.val_scale,
            config.val_scales,
            config.val_flip,
            alone,
        )
        _write_final(out, metrics, posteriors, int(best.extra.get("epoch") or 0))
    final = None
    if process.main and (out / FINAL_FILE).is_file():
        final = json.loads((out / FINAL_FILE).read_text())
        log(
            f"best epoch {final['epoch']} on {final['val_images']} validation images: dense "
            f"Q={final['val_scale']} top-1/top-5 error {final['val_top1_err']:.2f}%/"
            f"{final['val_top5_err']:.2f}%; Q={{{','.join(map(str, final['val_scales']))}}} "
            f"{final['val_multi_top1_err']:.2f}%/{final['val_multi_top5_err']:.2f}%"
        )
    distributed.barrier()
    return final


def train_and_report(config: TrainConfig, process: distributed.Process | None = None) -> int:
    """:func:`train` as a command runs it: a failure or a signal becomes one line on stderr and
    an exit code (0 done, 2 unusable input, 128 + N stopped by signal N after saving)."""
    try:
        train(config, process)
    except Interrupted as exc:
        if process is None or process.main:
            log(f"{exc}; run the same command to continue")
        return exc.exit_code
    except (DataError, CheckpointError, ValueError) as exc:
        log(f"error: {exc}")
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m train``: 0 when done, 2 on unusable input, 128 + N when stopped by signal N."""
    config = parse_args(argv)
    try:
        process = distributed.start(config.device)
    except (ValueError, RuntimeError) as exc:
        log(f"error: {exc}")
        return 2
    try:
        return train_and_report(config, process)
    finally:
        distributed.stop()


if __name__ == "__main__":
    sys.exit(main())
