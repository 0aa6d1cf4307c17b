"""What a finished run writes besides the model (reports, plots, the card's example input, the card) and
its publishing at the end of a run. Called by the end-of-run swap (pipelines/output_folder.py) with what the
trainer hands it; imports the report, card and publishing modules, which import nothing of the trainer."""

from __future__ import annotations

from pipelines.errors import UserError


def write_run_outputs(out, summary: dict, log_path, *, cfg, task, split: str, gathered: dict, raw_split, processor,
                      model, num_processes: int) -> dict:
    """eval_report.json/.md and plots for the run's final split (`gathered`: its per-example outputs; `log_path`:
    the run's metrics.jsonl, for the learning curves), the card's example input, then README.md (the model card).
    `model` is the trained model, unwrapped. Adds to `summary` (written next as run_summary.json) what publishing
    needs to render the card again for another repository: the labels, the number of processes and, for an adapter,
    the bytes of its files (pipelines/adapter_files.py artifact_sizes)."""
    import sys

    from pipelines.adapter_files import artifact_sizes
    from pipelines.cards import write_example_input, write_model_card
    from pipelines.report import write_report

    report = write_report(out, cfg, task, split, summary["results"][split], gathered, raw_split, log_path, processor)
    try:
        write_example_input(out, task, raw_split, processor)
    except Exception as e:  # noqa: BLE001 - the model is saved: a missing example must not fail the run
        print(f"warning: no example input for the model card: {type(e).__name__}: {' '.join(str(e).split())[:200]}",
              file=sys.stderr)
    id2label = getattr(getattr(model, "config", None), "id2label", None)  # a peft model gives its base's config
    summary["num_processes"] = num_processes
    summary.update(artifact_sizes(out))  # an adapter run: adapter_bytes, tokenizer_bytes (and merged_bytes)
    if id2label:  # what the card shows, without loading the model again
        summary["id2label"] = {str(i): name for i, name in id2label.items()}
    write_model_card(out, cfg, task, summary, report, id2label=id2label, num_processes=num_processes)
    return report


def publish_run(out, cfg) -> list[str]:
    """Push a finished output folder to cfg.push_to_hub and/or cfg.push_to_git (branch cfg.hub_revision,
    message cfg.hub_commit_message); a failure says how to retry without retraining."""
    import shlex

    from pipelines.publish import publish_to_git, publish_to_hub

    def retry(target: list[str]) -> str:
        options = [*target]
        if cfg.hub_revision:
            options += ["--revision", cfg.hub_revision]
        if cfg.hub_commit_message:
            options += ["--commit-message", cfg.hub_commit_message]
        return f"the trained model is saved in {out}: retry with " + shlex.join(["python", "scripts/publish.py", str(out), *options])

    done = []
    if cfg.push_to_hub:
        target = [cfg.push_to_hub] + (["--hub-endpoint", cfg.hub_endpoint] if cfg.hub_endpoint else []) \
            + (["--private"] if cfg.hub_private else [])
        try:
            url = publish_to_hub(out, cfg.push_to_hub, endpoint=cfg.hub_endpoint, private=cfg.hub_private,
                                 revision=cfg.hub_revision, commit_message=cfg.hub_commit_message)
        except UserError as e:
            raise UserError(f"{e} ({retry(target)})") from None
        print(f"published to {url}")
        done.append(str(url))
    if cfg.push_to_git:
        try:
            sha = publish_to_git(out, cfg.push_to_git, branch=cfg.hub_revision or "main",
                                 commit_message=cfg.hub_commit_message)
        except UserError as e:
            raise UserError(f"{e} ({retry(['--push-to-git', cfg.push_to_git])})") from None
        print(f"pushed to {cfg.push_to_git} ({cfg.hub_revision or 'main'}): commit {sha}")
        done.append(sha)
    return done
