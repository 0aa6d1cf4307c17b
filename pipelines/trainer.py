"""The one training loop every recipe uses, on Accelerate.

Read top to bottom: set up (output folder, Accelerator, data, model, strategy, optimizer), then the
loop (accumulate, clip, step, log, evaluate, checkpoint, stop early), then the end (best weights,
final evaluation, the atomic swap of pipelines/output_folder.py, publishing). Accelerate handles devices,
DDP/FSDP/DeepSpeed, mixed precision and checkpoint state; the task supplies the task-specific parts.
"""

from __future__ import annotations

import functools
import re

import torch

from pipelines import batch_size, checkpoints, evaluation_loop, trackers
from pipelines.accelerator import make_accelerator
from pipelines.config import RunConfig, config_hash, snapshot
from pipelines.distributed import parameter_fingerprints, prepare_engine
from pipelines.errors import UserError
from pipelines.evaluation_loop import eval_loader
from pipelines.optimization import optimization
from pipelines.output_folder import OutputFolder
from pipelines.run_log import LossMeter, RunLog
from pipelines.run_outputs import publish_run, write_run_outputs
from pipelines.tuning import describe_rates, plan_tuning

LOWER_IS_BETTER = re.compile(r"(loss|wer|cer|error)$")


def greater_is_better(task, metric: str) -> bool:
    """The task says for its main metric; for another, its name does (loss, wer, cer, error: lower is better)."""
    return task.greater_is_better if metric == task.main_metric else not LOWER_IS_BETTER.search(metric)


def is_better(value: float, best: float | None, greater: bool) -> bool:
    return best is None or (value > best if greater else value < best)


def check_metric_for_best(task, metric: str, cfg: RunConfig) -> None:
    """--metric-for-best must be one of the task's metrics (known once `load` has run): checked before the
    folder is touched, not at the first evaluation after training."""
    from pipelines.errors import closest

    names = tuple(task.metric_names())
    if not names:  # a task that does not declare them: checked at the first evaluation
        return
    names = (*names, "loss")
    if metric not in names:
        raise UserError(f"--metric-for-best {metric} is not a metric of the {cfg.recipe} recipe; "
                        f"choose one of: {', '.join(names)}.{closest(metric, names)}")


def metric_value(metrics: dict, metric: str) -> float:
    """--metric-for-best's value, for a task that declares no metric names (checked here, not before training)."""
    if metric not in metrics:
        raise UserError(f"--metric-for-best {metric} is not a metric of this recipe; "
                        f"choose one of: {', '.join(k for k in metrics if k != 'samples')}")
    return metrics[metric]


def non_finite_message(step: int, epoch: int, loss, kept_checkpoint) -> str:
    kept = f"the last good checkpoint ({kept_checkpoint}) is intact" if kept_checkpoint else "no checkpoint was written"
    return (f"loss became {float(loss.detach()):.4g} (gradient norm not finite) at optimizer step {step}, epoch {epoch}; "
            f"training stopped and {kept}. Lower --learning-rate, keep --max-grad-norm on, or check the data.")


def run_summary(cfg: RunConfig, plan, train_examples: int, state: dict, metric_for_best: str, results: dict) -> dict:
    """run_summary.json, less what the end of the run adds (rank fingerprints, labels, number of processes)."""
    return {
        "recipe": cfg.recipe, "model": cfg.model,
        "dataset": cfg.train_file or cfg.dataset,  # explicit files win over the recipe's default dataset
        "tuning": cfg.tuning, "trainable_params": plan.trainable_params, "total_params": plan.total_params,
        "train_examples": train_examples, "global_step": state["global_step"], "best_checkpoint": state["best_checkpoint"],
        "metric_for_best": metric_for_best, "results": results, "config_hash": config_hash(cfg),
    }


class Trainer:
    def __init__(self, cfg: RunConfig, recipe, keep_process_group: bool = False, on_evaluation=None):
        self.cfg, self.keep_process_group, self.on_evaluation = cfg, keep_process_group, on_evaluation  # see train()
        self.recipe = recipe.for_run(cfg)  # this run's own task object: the registered one stays unchanged
        self.folder = OutputFolder(cfg)  # the lock, where this run's files go, the end-of-run swap
        self.accelerator = make_accelerator(cfg)
        self.log = RunLog(self.accelerator, self.folder)
        self.metric_for_best = cfg.metric_for_best or self.recipe.main_metric
        self.greater_is_better = greater_is_better(self.recipe, self.metric_for_best)
        self.last_validation = None  # (step, metrics, gathered) of the latest validation
        # Progress that a checkpoint must carry for an exact resume.
        self.state = {"global_step": 0, "epoch": 0, "batches_seen_in_epoch": 0, "best_metric": None,
                      "best_checkpoint": None, "evals_without_improvement": 0, "mask_stage": 1, "last_eval_step": None}

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        from accelerate.utils import set_seed

        cfg, acc, folder = self.cfg, self.accelerator, self.folder
        if folder.work is None:  # not claimed (a caller without the lock, e.g. a test evaluating a folder)
            folder.plan(acc.num_processes, self.recipe.main_metric)
        set_seed(cfg.seed)
        # Rank 0 downloads and preprocesses first; the others then read its cache.
        with acc.main_process_first():
            # A task may read formats of its own (ner: CoNLL column files) through `load_splits`.
            splits = self.recipe.load_splits(cfg)
            model, self.processor = self.recipe.load(cfg, splits)
            self.encoded = self.recipe.preprocess(splits, self.processor, cfg)
        self.raw_splits = splits
        self.num_train_examples = len(self.encoded["train"])
        check_metric_for_best(self.recipe, self.metric_for_best, cfg)

        self.plan = plan_tuning(model, cfg, self.recipe.peft_task_type, self.recipe.head_modules)
        acc.print(f"{cfg.recipe}: {self.plan.describe()} (strategy: {cfg.tuning})")
        if self.plan.mask is not None and acc.distributed_type.name in ("DEEPSPEED", "FSDP"):
            raise UserError(f"--tuning gradual works on one device and with DDP, not with {acc.distributed_type.name}; "
                            "use --tuning last-n or full there")
        prepare_engine(acc, self.plan, cfg)
        collate = self.recipe.collator(self.processor, cfg)
        batch_size.settle(acc, self.plan.model, self.recipe, self.encoded, collate, cfg, folder)  # --batch-size auto
        # Only now, with data and model checked, touch the output folder: a bad input leaves it as it was.
        self.run_record = {"config": snapshot(cfg)["config"], "num_processes": acc.num_processes}  # in each checkpoint
        if acc.is_main_process:
            folder.start()
        acc.project_configuration.project_dir = str(folder.work)
        acc.project_configuration.logging_dir = str(folder.work / "tensorboard")
        train_loader, optimizer, scheduler, self.total_steps, self.num_epochs = optimization(
            acc, self.plan, self.encoded["train"], collate, cfg)
        acc.print(f"{cfg.recipe} ({cfg.tuning}): {describe_rates(cfg, self.plan)}")  # a staged schedule is known now
        eval_loaders = {split: eval_loader(ds, collate, cfg) for split, ds in self.encoded.items() if split != "train"}
        # split -> the longest-first order its loader reads the examples in (None: dataset order)
        self.eval_orders = {split: order for split, (_, order) in eval_loaders.items()}
        self.model, self.optimizer, self.train_loader, self.scheduler = acc.prepare(self.plan.model, optimizer, train_loader, scheduler)
        self.eval_loaders = {split: acc.prepare(loader) for split, (loader, _) in eval_loaders.items()}
        self.log.start(cfg)

    def evaluate(self, split: str = "validation") -> tuple[dict, dict]:
        """Metrics on a split and its per-example outputs (pipelines/evaluation_loop.py)."""
        return evaluation_loop.evaluate(self.model, self.eval_loaders[split], self.recipe, self.accelerator, self.cfg,
                                        split, self.eval_orders.get(split))

    # ------------------------------------------------------------------ the loop
    def loop(self) -> dict:
        """Train until the last step, the last epoch or early stopping; returns the progress (self.state)."""
        from accelerate import skip_first_batches
        from tqdm.auto import tqdm

        cfg, acc, mask = self.cfg, self.accelerator, self.plan.mask
        resumed = checkpoints.resume(acc, self.folder.work) if cfg.resume else None
        if resumed is not None:
            self.state = resumed
            if mask is not None:
                mask.load_state_dict({"stage": resumed["mask_stage"]})
        state = self.state
        progress = tqdm(total=self.total_steps, initial=state["global_step"], desc=f"{cfg.recipe} ({cfg.tuning})",
                        disable=not acc.is_local_main_process, dynamic_ncols=True)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm else float("inf")  # inf: measure, never clip
        meter = LossMeter(acc, self.recipe.pad_id(self.processor))
        stop = False
        while not stop and state["global_step"] < self.total_steps and state["epoch"] < self.num_epochs:
            epoch = state["epoch"]
            self.train_loader.set_epoch(epoch)
            if mask is not None and mask.update(epoch, state["global_step"]):
                self.log.unfreeze_stage(self.plan, state["global_step"], epoch, f"from epoch {epoch}")
            loader = self.train_loader
            if state["batches_seen_in_epoch"]:
                loader = skip_first_batches(loader, state["batches_seen_in_epoch"])
            for batch in loader:
                with acc.accumulate(self.model):
                    loss = self.model(**batch).loss
                    acc.backward(loss)
                    if acc.sync_gradients:
                        if mask is not None:
                            mask.apply()
                        grad_norm = acc.clip_grad_norm_(params, max_norm)  # None under DeepSpeed: it clips itself
                        if not torch.isfinite(torch.as_tensor(grad_norm if grad_norm is not None else loss.detach())):
                            kept = state["best_checkpoint"] or checkpoints.latest(self.folder.work)
                            raise UserError(non_finite_message(state["global_step"] + 1, epoch, loss, kept))
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                state["batches_seen_in_epoch"] += 1
                meter.add(batch, loss)
                if not acc.sync_gradients:
                    continue

                state["global_step"] += 1
                step = state["global_step"]
                progress.update(1)
                if mask is not None and mask.unit == "step" and mask.update(epoch, step):
                    self.log.unfreeze_stage(self.plan, step, epoch, f"at step {step}")
                if step % cfg.logging_steps == 0 or step == self.total_steps:
                    record = meter.record(step, epoch, self.scheduler.get_last_lr()[-1], cfg.batch_size)
                    self.log(record)
                    progress.set_postfix(loss=f"{record['train_loss']:.4f}")
                if cfg.eval_steps and step % cfg.eval_steps == 0:
                    stop = self.evaluate_and_checkpoint(epoch)
                if stop or step >= self.total_steps:
                    break
            else:  # the epoch ran to its end: checkpoints from here resume at the next epoch's start
                state["epoch"], state["batches_seen_in_epoch"] = epoch + 1, 0
                if not cfg.eval_steps:
                    stop = self.evaluate_and_checkpoint(epoch)
                continue
            break
        if state.get("last_eval_step") != state["global_step"]:
            # max_steps or the end fell between evaluations: the final weights compete for "best" too.
            if state["batches_seen_in_epoch"] >= len(self.train_loader):
                state["epoch"], state["batches_seen_in_epoch"] = state["epoch"] + 1, 0
            self.evaluate_and_checkpoint(state["epoch"])
        progress.close()
        return state

    def evaluate_and_checkpoint(self, epoch: int) -> bool:
        """Evaluate, log, checkpoint, and return True when early stopping says stop."""
        from pipelines.report import headline_metrics

        cfg, state, acc = self.cfg, self.state, self.accelerator
        metrics, gathered = self.evaluate("validation")
        self.last_validation = (state["global_step"], metrics, gathered)
        value = metric_value(metrics, self.metric_for_best)
        state["last_eval_step"] = state["global_step"]
        improved = is_better(value, state["best_metric"], self.greater_is_better)
        if improved:
            state["best_metric"], state["evals_without_improvement"] = value, 0
        else:
            state["evals_without_improvement"] += 1
        self.log({"step": state["global_step"], "epoch": epoch, **{f"eval_{k}": v for k, v in metrics.items()}})
        acc.print(f"step {state['global_step']}: {headline_metrics(metrics, self.metric_for_best)}")
        if self.on_evaluation is not None:  # e.g. a search's pruner, which may end the run by raising
            self.on_evaluation(state["global_step"], value, metrics)
        if cfg.save_checkpoints:
            if self.plan.mask is not None:
                state["mask_stage"] = self.plan.mask.stage
            if improved:
                state["best_checkpoint"] = checkpoints.checkpoint_name(state["global_step"])
            checkpoints.save_and_prune(acc, self.folder.work, state, self.run_record, cfg.keep_checkpoints)
        patience = cfg.early_stopping_patience
        if patience and state["evals_without_improvement"] >= patience:
            acc.print(f"early stopping: {self.metric_for_best} did not improve for {patience} evaluations")
            return True
        return False

    # ------------------------------------------------------------------ the end
    def finish(self) -> dict:
        """The best weights, the final evaluation of every split, the model and reports swapped into the folder,
        publishing; returns the run summary (run_summary.json)."""
        cfg, acc, state = self.cfg, self.accelerator, self.state
        best = state["best_checkpoint"]
        weights_evaluated = self.last_validation is not None and self.last_validation[0] == state["global_step"]
        if cfg.load_best_at_end and cfg.save_checkpoints and best and best != checkpoints.checkpoint_name(state["global_step"]):
            checkpoints.load_model_weights(acc, self.folder.work / "checkpoints" / best)
            weights_evaluated = False
            acc.print(f"loaded the best checkpoint {best} ({self.metric_for_best} {state['best_metric']:.4f})")
        results, final_split = {}, "test" if "test" in self.eval_loaders else "validation"
        for split in self.eval_loaders:
            if split == "validation" and weights_evaluated:  # these very weights were just evaluated
                metrics, gathered = self.last_validation[1:]
            else:
                metrics, gathered = self.evaluate(split)
            results[split] = metrics
            if split == final_split:  # the split the report and the card are about
                final_gathered = gathered
        summary = run_summary(cfg, self.plan, self.num_train_examples, state, self.metric_for_best, results)
        # Collective (every rank sums its own replica), and before saving: --merge-lora merges on the main process only.
        fingerprints = parameter_fingerprints(acc, self.model)
        if fingerprints:  # DDP only: tests (and users) check that no rank drifted
            summary["rank_parameter_fingerprints"] = fingerprints
        outputs = functools.partial(write_run_outputs, cfg=cfg, task=self.recipe, split=final_split,
                                    gathered=final_gathered, raw_split=self.raw_splits[final_split],
                                    processor=self.processor, model=acc.unwrap_model(self.model),
                                    num_processes=acc.num_processes)
        trackers.log_final(acc, results, state["global_step"])
        self.folder.save_final(acc, self.model, self.processor, results, summary, outputs)
        end_training(acc, self.keep_process_group, self.folder.out, state["global_step"])
        if (cfg.push_to_hub or cfg.push_to_git) and acc.is_main_process:
            publish_run(self.folder.out, cfg)
        return summary


def end_training(acc, keep_process_group: bool, out, step: int) -> None:
    """The trackers get the finished folder's reports (`out`), then close."""
    trackers.log_reports(acc, out, step)
    if keep_process_group:  # more runs follow in this process (scripts/compare.py): close the trackers only
        for tracker in acc.trackers:
            tracker.finish()
    else:
        acc.end_training()


def train(cfg: RunConfig, recipe, keep_process_group: bool = False, on_evaluation=None) -> dict:
    """One run, start to end. `keep_process_group`: more runs follow in this process (scripts/compare.py), so the
    end leaves the distributed process group up (a new one in the same process can deadlock on the old one's keys).
    `on_evaluation(step, value, metrics)`: called on every process after each validation (value: --metric-for-best's),
    before its checkpoint; an exception it raises ends the run there (the folder keeps its last good state)."""
    from pipelines import feature_extraction

    trainer = Trainer(cfg, recipe, keep_process_group, on_evaluation)
    try:
        trainer.folder.claim(trainer.accelerator, trainer.recipe.main_metric)
        trainer.setup()
        # A frozen backbone -> pooled vector -> head model: features once, the head on them (seconds); else the loop.
        pooling = None
        if cfg.tuning == "feature-extraction":
            pooling = feature_extraction.choose_pooling(trainer.accelerator.unwrap_model(trainer.model), cfg, trainer.accelerator)
        if pooling is not None:
            feature_extraction.train_head(trainer, pooling)
        else:
            trainer.loop()
        return trainer.finish()
    except BaseException:  # a failed or pruned run: its tracker runs end too (a search's next trial opens new ones)
        trackers.close_quietly(trainer.accelerator)
        raise
    finally:  # on errors and Ctrl-C too
        trainer.folder.release()
