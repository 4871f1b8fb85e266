"""``python -m train``: the paper's training recipe (section 3.1) on an ImageFolder tree.

    python -m train --data DIR --arch vgg16 --scale 256:512              # one device
    torchrun --nproc-per-node 8 -m train --data DIR --arch vgg16         # 8 GPUs, same result
    python -m train --data DIR --arch vgg16_bn --width 0.125 --fc-width 256 --crop 64 \\
        --scale 64:128 --init kaiming                                    # a small CPU variant

Every random draw is a function of ``--seed`` and the position in training (see
``train.data`` and ``train.layers``), so a run resumed from any checkpoint, or split over any
number of processes, takes the same steps as one uninterrupted process.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from train import distributed
from train.augment import Lighting, TrainAugmentation, pixel_statistics
from train.checkpoints import (
    BEST,
    LAST,
    atomic_save,
    read,
    restore_rng_states,
    rng_states,
    weights_checkpoint,
)
from train.data import DataError, EpochBatches, Folder, TrainSet, load_rgb, scan_folder
from train.evaluate import collect, error_rates, serving_graph
from train.initialise import init_from, initialise
from train.layers import StepClock, convert_sync_batchnorm, use_batch_dropout
from train.options import parse_args
from train.reporting import epoch_line, log, plot_curves, write_metrics
from train.schedule import LearningRate
from vgg.checkpoint import CheckpointError, check_state_dict, load_weights
from vgg.models import IMAGENET_MEAN, IMAGENET_STD, VGG, resolve_arch

FINAL_FILE = "final.json"
POSTERIORS_FILE = "posteriors.npz"
# Training images are shrunk to this shorter side before their pixel statistics are taken.
STATS_SIDE = 64
_STATS_SALT = 17
_VAL_SALT = 19


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived; the run saved its state and stops."""


@dataclass
class Normalisation:
    """The graph's mean/std (on [0, 1]) and the colour PCA of the training set."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    lighting: Lighting | None

    def to_dict(self) -> dict:
        lighting = None
        if self.lighting is not None:
            lighting = {
                "eigval": list(self.lighting.eigval),
                "eigvec": [list(r) for r in self.lighting.eigvec],
            }
        return {"mean": list(self.mean), "std": list(self.std), "lighting": lighting}

    @classmethod
    def from_dict(cls, values: dict, lighting_std: float) -> Normalisation:
        lighting = values.get("lighting")
        return cls(
            tuple(values["mean"]),
            tuple(values["std"]),
            None
            if lighting is None or lighting_std == 0
            else Lighting(
                tuple(lighting["eigval"]), tuple(tuple(r) for r in lighting["eigvec"]), lighting_std
            ),
        )


def dataset_statistics(folder: Folder, count: int, seed: int, normalize: str, lighting_std: float):
    """Mean/std for ``normalize`` and the colour PCA, from ``count`` sampled training images."""
    rng = np.random.default_rng([seed, _STATS_SALT])
    picks = rng.choice(len(folder), size=min(count, len(folder)), replace=False)
    images = []
    for i in sorted(picks):
        image = load_rgb(folder.samples[i][0])
        if min(image.size) > STATS_SIDE:
            scale = STATS_SIDE / min(image.size)
            image = image.resize(
                (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            )
        images.append(image)
    mean, std, lighting = pixel_statistics(images)
    if normalize == "imagenet":
        graph_mean, graph_std = IMAGENET_MEAN, IMAGENET_STD
    elif normalize == "mean-std":
        graph_mean, graph_std = tuple(mean.tolist()), tuple(std.tolist())
    else:  # the paper: subtract the mean RGB value, nothing else (std 1/255 on the [0,1] scale)
        graph_mean, graph_std = tuple(mean.tolist()), (1 / 255,) * 3
    lighting = Lighting(lighting.eigval, lighting.eigvec, lighting_std) if lighting_std else None
    return Normalisation(graph_mean, graph_std, lighting)


@dataclass
class Progress:
    """Running sums of an epoch (kept in the checkpoint for a mid-epoch resume)."""

    loss: float = 0.0
    correct: float = 0.0
    seconds: float = 0.0

    def to_list(self) -> list[float]:
        return [self.loss, self.correct, self.seconds]


@dataclass
class RunState:
    epoch: int = 0  # completed epochs
    step: int = 0  # completed steps of the current epoch
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    finished: bool = False
    progress: Progress = field(default_factory=Progress)


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
    posteriors = collect(graph, images, all_scales, model.spec.crop, ("dense",), flip, proc.device)
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
    multi = np.mean([dense[q] for q in scales], axis=0)
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


def _scan(args) -> tuple[Folder, Folder]:
    train = scan_folder(args.data / "train")
    val = scan_folder(args.data / "val", train.classes)
    return train, val


def _unwrap(model: torch.nn.Module) -> VGG:
    return model.module if isinstance(model, DistributedDataParallel) else model


def run(args, proc: distributed.Process) -> int:
    cores = distributed.available_cores()
    torch.set_num_threads(args.threads or max(1, cores // max(1, proc.local_world)))
    out: Path = args.output_dir
    if proc.main:
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    last_path = out / LAST

    saved = None
    if last_path.is_file():
        if not args.resume:
            raise ValueError(f"{last_path} exists; remove {out} or drop --no-resume to continue it")
        saved = read(last_path)
        if saved.get("finished"):
            if proc.main:
                log(f"{out}: training already finished at epoch {saved['epoch']}; nothing to do")
            _final_evaluation(args, proc, out)
            return 0

    train_folder, val_folder = _scan(args)
    classes = train_folder.classes
    spec = resolve_arch(
        args.arch,
        width=args.width,
        fc_width=args.fc_width,
        crop=args.crop,
        num_classes=len(classes),
        dropout=args.dropout,
    )
    torch.manual_seed(args.seed)
    model = VGG(spec)
    state = RunState()
    source = None
    if saved is not None:
        if saved["spec"] != spec.to_dict() or list(saved["classes"]) != list(classes):
            raise ValueError(
                f"{last_path} was trained as {saved['spec']} on classes {saved['classes'][:5]}..., "
                f"which differs from this command; use another --output-dir"
            )
        check_state_dict(model, saved["model"], str(last_path))
        model.load_state_dict(saved["model"])
        norm = Normalisation.from_dict(saved["normalisation"], args.lighting)
        state = RunState(
            epoch=saved["epoch"],
            step=saved["step"],
            history=list(saved["history"]),
            best=saved["best"],
            progress=Progress(*saved["progress"]),
        )
        if proc.main:
            log(f"resuming {out} at epoch {state.epoch + 1}, step {state.step}")
    else:
        norm = dataset_statistics(
            train_folder, args.stats_images, args.seed, args.normalize, args.lighting
        )
        initialise(model, args.init)
        if args.init_from:
            source = load_weights(args.init_from, args.init_from_arch)
            copied = init_from(model, source.model)
            if proc.main:
                log(f"initialised {', '.join(copied)} from {args.init_from}")
        if args.finetune_from:
            source = load_weights(args.finetune_from, args.arch)
            check_state_dict(model, source.model.state_dict(), str(args.finetune_from))
            model.load_state_dict(source.model.state_dict())
            # The weights expect the normalisation they were trained with.
            norm = Normalisation(source.mean, source.std, norm.lighting)
            if proc.main:
                log(f"fine-tuning from {args.finetune_from}")

    clock = StepClock(global_batch=args.batch_size)
    use_batch_dropout(model, clock)
    device = proc.device
    on_gpu = device.type == "cuda"
    model.to(device)
    channels_last = on_gpu and args.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if proc.world > 1 and spec.batch_norm and args.sync_bn:
        model = convert_sync_batchnorm(model, device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    schedule = LearningRate(
        kind=args.lr_scheduler,
        base_lr=args.lr,
        epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        factor=args.lr_factor,
        patience=args.lr_patience,
        max_drops=args.lr_drops,
        step_size=args.lr_step_size,
    )
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["scheduler"])
        restore_rng_states(saved["rng"])
    net = model
    if proc.world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if on_gpu else None)

    smin, smax = args.scale
    augmentation = TrainAugmentation(smin, smax, spec.crop, args.flip, norm.lighting)
    dataset = TrainSet(train_folder, augmentation, args.seed)
    sampler = EpochBatches(len(dataset), args.batch_size, args.seed, proc.rank, proc.world)
    workers = args.workers if args.workers is not None else (8 if on_gpu else 1)
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
    # The served graph's normalisation, x * scale + shift, computed the same way.
    pixel_scale, pixel_shift = 1.0 / (255.0 * std), -mean / std
    val_rng = np.random.default_rng([args.seed, _VAL_SALT])
    val_indices = list(range(len(val_folder)))
    if args.val_images and args.val_images < len(val_folder):
        val_indices = sorted(
            val_rng.choice(len(val_folder), args.val_images, replace=False).tolist()
        )

    if proc.main:
        log(
            f"{spec.arch} (width {spec.width}, FC {spec.fc_width}, crop {spec.crop}, "
            f"{len(classes)} classes) on {len(train_folder)} training / {len(val_folder)} "
            f"validation images; {proc.world} process(es) on {device.type}, "
            f"{torch.get_num_threads()} threads, {workers} loader workers; S={smin}"
            + (f":{smax}" if smax != smin else "")
            + f", batch {args.batch_size}, {sampler.steps_per_epoch} steps/epoch"
        )

    def save_last() -> None:
        if not proc.main:
            return
        checkpoint = weights_checkpoint(
            _unwrap(net),
            classes,
            norm.mean,
            norm.std,
            state.epoch,
            step=state.step,
            finished=state.finished,
            optimizer=optimizer.state_dict(),
            scheduler=schedule.state_dict(),
            rng=rng_states(),
            normalisation=norm.to_dict(),
            history=state.history,
            best=state.best,
            progress=state.progress.to_list(),
            args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            world_size=proc.world,
        )
        atomic_save(checkpoint, last_path)

    stop = StopSignal()
    show_progress = args.progress if args.progress is not None else sys.stderr.isatty()
    try:
        while state.epoch < args.epochs and not state.finished:
            epoch = state.epoch
            sampler.set_epoch(epoch, state.step)
            net.train()
            started = time.perf_counter()
            # loss * n and correct answers, summed on the device and read once per epoch
            totals_t = torch.zeros(2, dtype=torch.float64, device=device)
            steps = sampler.steps_per_epoch
            bar = None
            if show_progress and proc.main:
                from tqdm import tqdm

                bar = tqdm(
                    total=steps,
                    initial=state.step,
                    desc=f"epoch {epoch + 1}/{args.epochs}",
                    leave=False,
                    dynamic_ncols=True,
                )
            for pixels, shift, labels in loader:
                step = state.step
                lr = schedule.at(epoch, step, steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                clock.key = (args.seed, epoch, step)
                clock.offset = proc.rank * sampler.local_batch
                x = pixels.to(device, non_blocking=True).float()
                x = (
                    x + shift.to(device, non_blocking=True)[:, :, None, None]
                ) * pixel_scale + pixel_shift
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                labels = labels.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu and args.amp):
                    logits = net(x)
                loss = F.cross_entropy(logits.float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    totals_t[0] += loss.detach().double() * len(labels)
                    totals_t[1] += (logits.argmax(1) == labels).sum()
                state.step += 1
                if bar is not None:
                    bar.update(1)
                    if state.step % 10 == 0:
                        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")
                interrupted = stop.received is not None
                if proc.world > 1:
                    interrupted = distributed.any_process(interrupted)
                periodic = args.save_every_steps and state.step % args.save_every_steps == 0
                if (interrupted or periodic) and state.step < steps:
                    partial = totals_t.tolist()
                    totals_t.zero_()
                    state.progress.loss += partial[0]
                    state.progress.correct += partial[1]
                    state.progress.seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    save_last()
                    if interrupted:
                        raise Interrupted
            if bar is not None:
                bar.close()
            totals = totals_t.tolist()
            p = state.progress
            local = [p.loss + totals[0], p.correct + totals[1]]
            seconds = p.seconds + time.perf_counter() - started
            loss_sum, correct = distributed.sum_all(local)
            seen = steps * args.batch_size
            row = {
                "epoch": epoch + 1,
                "lr": schedule.at(epoch, steps - 1, steps),
                "train_loss": loss_sum / seen,
                "train_top1_err": 100.0 * (1 - correct / seen),
                "images_per_s": seen / max(seconds, 1e-9),
                "epoch_s": seconds,
            }
            last_epoch = epoch + 1 == args.epochs
            if (args.val_every and (epoch + 1) % args.val_every == 0) or last_epoch:
                val_started = time.perf_counter()
                metrics, posteriors = validate(
                    _unwrap(net),
                    norm,
                    val_folder,
                    val_indices,
                    args.val_scale,
                    args.val_scales,
                    args.val_flip,
                    proc,
                )
                row.update(metrics)
                row["val_s"] = time.perf_counter() - val_started
                if schedule.observe(metrics["val_multi_top1_err"]):
                    state.finished = True
                    row["stopped"] = f"no improvement after {schedule.drops} learning-rate drops"
                if (
                    state.best is None
                    or metrics["val_multi_top1_err"] < state.best["val_multi_top1_err"]
                ):
                    state.best = {
                        "epoch": epoch + 1,
                        **{k: metrics[k] for k in ("val_multi_top1_err", "val_images")},
                    }
                    if proc.main:
                        best = weights_checkpoint(
                            _unwrap(net), classes, norm.mean, norm.std, epoch + 1, metrics=metrics
                        )
                        atomic_save(best, out / BEST)
                        if metrics["val_images"] == len(val_folder):
                            _write_final(out, metrics, posteriors, epoch + 1)
            state.history.append(row)
            state.epoch, state.step, state.progress = epoch + 1, 0, Progress()
            state.finished = state.finished or state.epoch >= args.epochs
            save_last()
            if proc.main:
                write_metrics(out, state.history)
                plot_curves(out, state.history, f"{spec.arch} width {spec.width} on {args.data}")
                log(epoch_line(row, args.epochs))
    except Interrupted:
        if proc.main:
            log(
                f"stopped by signal {stop.received}: saved {last_path} at epoch {state.epoch + 1}, "
                f"step {state.step}; run the same command to continue"
            )
        return 128 + int(stop.received or 15)
    finally:
        stop.restore()
    _final_evaluation(args, proc, out)
    return 0


def _write_final(out: Path, metrics: dict, posteriors: dict, epoch: int) -> None:
    result = {"epoch": epoch, **{k: v for k, v in metrics.items()}}
    (out / FINAL_FILE).write_text(json.dumps(result, indent=2) + "\n")
    np.savez(out / POSTERIORS_FILE, **posteriors)


def _final_evaluation(args, proc: distributed.Process, out: Path) -> None:
    """The best weights on every validation image, unless that was already measured.

    Runs on the main process alone (the others wait), so it needs no shared file system.
    """
    if proc.main and not (out / FINAL_FILE).is_file() and (out / BEST).is_file():
        best = load_weights(out / BEST)
        _, val_folder = _scan(args)
        alone = distributed.Process(0, 1, 0, 1, proc.device)
        metrics, posteriors = validate(
            best.model.to(proc.device),
            Normalisation(best.mean, best.std, None),
            val_folder,
            list(range(len(val_folder))),
            args.val_scale,
            args.val_scales,
            args.val_flip,
            alone,
        )
        _write_final(out, metrics, posteriors, int(best.extra.get("epoch") or 0))
    if proc.main and (out / FINAL_FILE).is_file():
        final = json.loads((out / FINAL_FILE).read_text())
        log(
            f"best epoch {final['epoch']} on {final['val_images']} validation images: dense "
            f"Q={final['val_scale']} top-1/top-5 error {final['val_top1_err']:.2f}%/"
            f"{final['val_top5_err']:.2f}%; Q={{{','.join(map(str, final['val_scales']))}}} "
            f"{final['val_multi_top1_err']:.2f}%/{final['val_multi_top5_err']:.2f}%"
        )
    distributed.barrier()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        proc = distributed.start(args.device)
    except (ValueError, RuntimeError) as exc:
        log(f"error: {exc}")
        return 2
    try:
        return run(args, proc)
    except (DataError, CheckpointError, ValueError) as exc:
        log(f"error: {exc}")
        return 2
    finally:
        distributed.stop()


if __name__ == "__main__":
    sys.exit(main())
