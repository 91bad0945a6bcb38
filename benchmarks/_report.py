"""Turn the suite's results into the Markdown report and the bar chart of the per-step ratios.

Ratios to the plain loop are paired: each round's contender time is divided
by the plain loop's time of the same round, and the tables show the median
and the range of those per-round ratios. The rounds are interleaved, so a
slow stretch on a shared machine affects both times of a pair.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._timing import Summary, markdown_table

#: Megabytes (10**6 bytes) per MiB: the memory goal is stated in MB.
MB_PER_MIB = 2**20 / 1e6
#: The targets of ``python -m benchmarks``; see `goal_rows`.
GOAL_MINIMAL_RATIO = 1.03
GOAL_FULL_RATIO = 1.10
GOAL_IMPORT_SECONDS = 0.15
GOAL_MEMORY_MB = 30.0
GOAL_STALL_SHARE = 0.10


def paired_ratios(runs: dict[str, list[dict[str, Any]]], key: str, field: str) -> list[float]:
    """Return each round's ``field`` of contender ``key`` divided by the plain loop's in the same round and process."""
    return [run[field] / run[f"plain_{field}"] for run in runs[key]]


def per_step_us(runs: list[dict[str, Any]], field: str, steps: int) -> Summary:
    return Summary.of([run[field] for run in runs]).scaled(1e6 / steps)


def spread(values: Sequence[float], digits: int = 2, suffix: str = "") -> str:
    return f"{min(values):.{digits}f}..{max(values):.{digits}f}{suffix}"


def step_table(part: dict[str, Any]) -> str:
    """Return the per-step table of one workload: CPU and wall time per step, and paired ratios."""
    runs = part["results"]
    steps = part["steps"]
    rows = []
    for key, info in part["contenders"].items():
        if key not in runs:
            rows.append([info["label"], "not installed", "", "", "", ""])
            continue
        cpu = per_step_us(runs[key], "loop_cpu_seconds", steps)
        wall = per_step_us(runs[key], "loop_seconds", steps)
        cpu_ratios = paired_ratios(runs, key, "loop_cpu_seconds")
        wall_ratios = paired_ratios(runs, key, "loop_seconds")
        difference = runs[key][0]["weight_difference"]
        rows.append([
            info["label"],
            f"{cpu.median:.1f} ({cpu.minimum:.0f}..{cpu.maximum:.0f})",
            f"{statistics.median(cpu_ratios):.3f}x ({spread(cpu_ratios)})",
            f"{wall.median:.1f} ({wall.minimum:.0f}..{wall.maximum:.0f})",
            f"{statistics.median(wall_ratios):.3f}x ({spread(wall_ratios)})",
            f"{difference:.0e}",
        ])
    headers = ["contender", "CPU µs/step (range)", "CPU ratio (range)", "wall µs/step (range)",
               "wall ratio (range)", "weights vs plain"]
    return markdown_table(headers, rows, [False, True, True, True, True, True])


def memory_table(memory: dict[str, Any], labels: dict[str, str]) -> str:
    plain = memory.get("plain")
    rows = []
    for key, reading in memory.items():
        if not reading.get("installed", True):
            rows.append([labels.get(key, key), "not installed", "", "", "", ""])
            continue
        peak = reading["peak_rss_mib"]
        above = f"{peak - plain['peak_rss_mib']:+.1f}" if plain is not None else ""
        rows.append([labels.get(key, key), f"{reading['rss_after_torch_mib']:.1f}",
                     f"{reading['rss_after_imports_mib']:.1f}", f"{peak:.1f}", above,
                     f"{peak - reading['rss_after_imports_mib']:.1f}"])
    headers = ["contender", "RSS after torch", "after framework import", "peak RSS", "peak vs plain",
               "peak − after imports"]
    return markdown_table(headers, rows, [False, True, True, True, True, True])


def import_section(part: dict[str, Any], labels: dict[str, str]) -> list[str]:
    medians = part["median_s"]
    torch_median = medians.get("torch")
    rows = []
    for name, values in part["samples_s"].items():
        extra = f"{medians[name] - torch_median:+.3f}" if torch_median is not None and name != "torch" else ""
        rows.append([labels.get(name, name), f"{medians[name]:.3f}", spread(values, 3), extra])
    lines = [markdown_table(["case", "median s", "range s", "vs import torch, s"], rows, [False, True, True, True])]
    breakdown = part["breakdown"]
    lines += [
        "",
        f"`python -X importtime -c \"import torch; import hookrt; hookrt.Trainer; hookrt.LightningModule\"`: "
        f"{breakdown['modules_added']} modules are imported after torch, "
        f"{breakdown['top_level_cumulative_us'] / 1000:.1f} ms in all (one run, so only a rough figure). "
        "The largest, by cumulative time:",
        "",
        markdown_table(["module", "self ms", "cumulative ms"],
                       [[f"`{entry['module']}`", f"{entry['self_us'] / 1000:.1f}",
                         f"{entry['cumulative_us'] / 1000:.1f}"] for entry in breakdown["top"]],
                       [False, True, True]),
    ]
    return lines


def checkpoint_section(part: dict[str, Any]) -> list[str]:
    sync = part["sync_stall_s"]
    stalls = part["async_stall_s"]
    writes = part["async_write_s"]
    rows = [
        ["synchronous `save_checkpoint(path)`", f"{statistics.median(sync):.3f}", spread(sync, 3), "1.00"],
        ["asynchronous `save_checkpoint(path, asynchronous=True)`", f"{statistics.median(stalls):.3f}",
         spread(stalls, 3),
         f"{statistics.median(stalls) / statistics.median(sync):.2f}"],
        ["asynchronous, from the save until the file is complete", f"{statistics.median(writes):.3f}",
         spread(writes, 3),
         f"{statistics.median(writes) / statistics.median(sync):.2f}"],
    ]
    extra_rows = [
        [kind, f"{statistics.median(part[f'{key}_extra_s']):.3f}", spread(part[f"{key}_extra_s"], 3)]
        for kind, key in (("synchronous", "sync"), ("asynchronous", "async"))
    ]
    return [
        f"Model: {part['parameters'] / 1e6:.1f}M parameters ({4} linear layers of width {part['layer_width']}), "
        f"Adam state included; file {part['file_mib']:.0f} MiB on {part['folder_filesystem']}; "
        f"{part['rounds']} rounds, sync and async alternating, after a warm-up save of each kind. Each save is "
        "made during fit, after a batch. Its stall is the time the training thread is blocked: the save call, and "
        "for an asynchronous save also the time the next optimizer step waits for the background copy of the "
        "weights and the optimizer state.",
        "",
        markdown_table(["save", "median stall s", "range s", "vs synchronous"], rows, [False, True, True, True]),
        "",
        f"The background copy and write do not block training, but they compete with it for memory bandwidth "
        f"and cores. The whole cost of a save, the time that the {part['window_batches']} batches after it "
        f"took beyond {part['window_batches']} median batches ({part['median_batch_s'] * 1000:.0f} ms each) of the "
        "same fit, from the end of the batch before the save:",
        "",
        markdown_table(["save", "median extra time s", "range s"], extra_rows, [False, True, True]),
        "",
        f"The warm-up saves are left out of the tables. The first asynchronous save of a run allocates its host "
        f"buffers, and stalled training for {part['first_async_stall_s']:.3f} s here (the first synchronous save: "
        f"{part['first_sync_stall_s']:.3f} s); later saves copy into the buffers of the previous one.",
    ]


def goal_rows(results: dict[str, Any]) -> list[list[str]]:
    """Return one row per goal: what is measured, the value, the target and whether it is met."""
    rows: list[list[str]] = []

    def add(goal: str, value: float | None, shown: str, target: str, limit: float) -> None:
        if value is None:
            rows.append([goal, "not measured", target, ""])
        else:
            rows.append([goal, shown, target, "met" if value <= limit else "NOT met"])

    mlp = results.get("mlp")
    for key, goal, limit in (("hookrt", "tiny MLP, minimal plugins: CPU-time ratio", GOAL_MINIMAL_RATIO),
                             ("hookrt-full", "tiny MLP, full default stack: CPU-time ratio", GOAL_FULL_RATIO)):
        if mlp is None or key not in mlp["results"]:
            add(goal, None, "", f"≤ {limit:.2f}x", limit)
            continue
        cpu = statistics.median(paired_ratios(mlp["results"], key, "loop_cpu_seconds"))
        wall = statistics.median(paired_ratios(mlp["results"], key, "loop_seconds"))
        add(goal, cpu, f"{cpu:.3f}x (wall {wall:.3f}x)", f"≤ {limit:.2f}x", limit)
    imports = results.get("import")
    if imports is not None and "hookrt_api" in imports["median_s"]:
        extra = imports["median_s"]["hookrt_api"] - imports["median_s"]["torch"]
        add("import hookrt (+ Trainer, LightningModule) − import torch", extra, f"{extra:+.3f} s",
            f"≤ {GOAL_IMPORT_SECONDS} s", GOAL_IMPORT_SECONDS)
    else:
        add("import hookrt − import torch", None, "", f"≤ {GOAL_IMPORT_SECONDS} s", GOAL_IMPORT_SECONDS)
    memory = results.get("memory", {})
    if "peak_rss_mib" in memory.get("plain", {}) and "peak_rss_mib" in memory.get("hookrt-full", {}):
        above = (memory["hookrt-full"]["peak_rss_mib"] - memory["plain"]["peak_rss_mib"]) * MB_PER_MIB
        add("peak RSS, full default stack − plain loop", above, f"{above:+.1f} MB", f"≤ {GOAL_MEMORY_MB:.0f} MB",
            GOAL_MEMORY_MB)
    else:
        add("peak RSS, full default stack − plain loop", None, "", f"≤ {GOAL_MEMORY_MB:.0f} MB", GOAL_MEMORY_MB)
    stall = results.get("checkpoint")
    if stall is not None:
        share = stall["async_median_s"] / stall["sync_median_s"]
        add("asynchronous checkpoint stall / synchronous stall (medians)", share, f"{share:.2f}",
            f"≤ {GOAL_STALL_SHARE:.2f}", GOAL_STALL_SHARE)
    else:
        add("asynchronous checkpoint stall / synchronous stall", None, "", f"≤ {GOAL_STALL_SHARE:.2f}",
            GOAL_STALL_SHARE)
    return rows


def render(machine: dict[str, Any], settings: dict[str, Any], results: dict[str, Any],
           failures: dict[str, str]) -> str:
    """Return the Markdown report of one run of the suite."""
    quick = settings["quick"]
    lines = [
        "# hookrt benchmarks",
        "",
        f"Written by `python -m benchmarks{' --quick' if quick else ''}` on {machine['started']}, at commit "
        f"`{machine['commit']}`. Per-step figures are per optimizer step of one epoch, measured from the "
        "framework's train-start event to its train-end event. CPU time is the training thread's "
        "`time.thread_time`; it leaves out the time the thread waits for a core, so it varies less than the "
        "wall clock while other processes share the machine. hookrt, Lightning and Ignite each run in a process "
        "of their own that also runs the plain loop, because a framework's imports change the speed of the "
        "others' loops by a few percent. The rounds within a process are interleaved, and each ratio divides a "
        "contender's time by the plain loop's time of the same round in the same process: the table shows the "
        "median of those ratios and their range. The plain row is from the hookrt process.",
        "",
        "## Goals",
        "",
    ]
    if quick:
        lines.append("Not checked: `--quick` measures too few steps for the figures to mean much.")
    else:
        lines.append(markdown_table(["goal", "measured", "target", "verdict"], goal_rows(results),
                                    [False, True, True, False]))
    labels: dict[str, str] = {}
    for name, title in (("mlp", "tiny MLP"), ("digits", "digits CNN")):
        part = results.get(name)
        if part is None:
            continue
        labels.update({key: info["label"] for key, info in part["contenders"].items()})
        lines += [
            "",
            f"## Per-step time: {title}",
            "",
            f"{part['description']}; SGD lr 0.01, cross entropy; one epoch of {part['steps']} steps; "
            f"{part['rounds']} interleaved rounds after one warm-up run each; torch threads "
            f"{part['torch_threads']}, OMP_NUM_THREADS={part['thread_variables']['OMP_NUM_THREADS']}, "
            f"MKL_NUM_THREADS={part['thread_variables']['MKL_NUM_THREADS']}.",
            "",
            step_table(part),
        ]
    if "memory" in results:
        lines += [
            "",
            "## Peak resident memory (MiB)",
            "",
            "Each contender trains the tiny MLP for one epoch in a fresh process of its own. The peak "
            "(`getrusage(RUSAGE_SELF).ru_maxrss`) covers the whole process: interpreter, torch, the framework "
            "and what it imports lazily during the run, the data and the run. Absolute peaks are compared, so a "
            "framework's import cost counts; the last column leaves the imports of torch and the framework out.",
            "",
            memory_table(results["memory"], labels),
        ]
    if "import" in results:
        lines += ["", "## Import time", "", "Fresh interpreters, in rotating order; each times its own import "
                  "statements, so interpreter start-up is left out.", ""]
        lines += import_section(results["import"], IMPORT_LABELS)
    if "checkpoint" in results:
        lines += ["", "## Checkpoint stall", ""]
        lines += checkpoint_section(results["checkpoint"])
    lines += ["", "## Contenders", ""]
    for part_name in ("mlp", "digits"):
        part = results.get(part_name)
        if part is not None:
            lines += [f"- {info['label']}: {info['stack']}." for info in part["contenders"].values()]
            break
    lines += ["", "## Machine", ""] + machine_lines(machine)
    if failures:
        lines += ["", "## Failed parts", ""]
        for name, error in failures.items():
            lines += [f"- {name}:", "", "```", error, "```"]
    return "\n".join(lines) + "\n"


IMPORT_LABELS = {
    "torch": "`import torch`",
    "hookrt": "`import hookrt` (does not import torch)",
    "hookrt_api": "`import hookrt; hookrt.Trainer; hookrt.LightningModule`",
    "hookrt_trainer": "the same plus `hookrt.Trainer()` (default plugin stack)",
}


def machine_lines(machine: dict[str, Any]) -> list[str]:
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    return [
        f"- CPU: {machine['cpu']}, {machine['logical_cpus']} logical CPUs available to the process",
        f"- load average (1 min) at start / end: {machine['load_average_at_start']} / "
        f"{machine.get('load_average_at_end', 'unknown')}",
        f"- Python {machine['python']} on {machine['platform']}",
        f"- packages: {versions}",
        f"- commit: `{machine['commit']}`",
    ]


def write_chart(results: dict[str, Any], path: Path) -> str:
    """Draw the paired CPU-time ratios per contender as bars with their ranges; return what was done."""
    parts = [(name, title) for name, title in (("mlp", "tiny MLP"), ("digits", "digits CNN")) if name in results]
    if not parts:
        return "No per-step results, so no chart was drawn."
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed, so ratios.png was not drawn. Install the `bench` extra to draw it."
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, len(parts), figsize=(6.5 * len(parts), 4.5), squeeze=False)
    for axis, (name, title) in zip(axes[0], parts, strict=True):
        runs = results[name]["results"]
        keys = [key for key in results[name]["contenders"] if key in runs and key != "plain"]
        ratios = [paired_ratios(runs, key, "loop_cpu_seconds") for key in keys]
        medians = [statistics.median(values) for values in ratios]
        low = [median - min(values) for median, values in zip(medians, ratios, strict=True)]
        high = [max(values) - median for median, values in zip(medians, ratios, strict=True)]
        positions = list(range(len(keys)))
        axis.barh(positions, medians, xerr=[low, high], color="#4c72b0", capsize=3)
        axis.set_yticks(positions, [results[name]["contenders"][key]["label"] for key in keys])
        axis.invert_yaxis()
        axis.axvline(1.0, color="black", linewidth=1)
        for position, median, values in zip(positions, medians, ratios, strict=True):
            axis.text(max(values), position, f"  {median:.2f}x", va="center", ha="left", fontsize=8)
        axis.set_xlabel("CPU time per step / plain PyTorch\n(median of per-round ratios; bars: range)")
        axis.set_title(f"{title}, {results[name]['steps']} steps, {results[name]['rounds']} rounds")
        axis.set_xlim(0, max(max(values) for values in ratios) * 1.2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return f"Wrote {path}."
