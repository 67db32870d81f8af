"""Runs the registered benchmarks and writes ``results.json`` and ``results.md``.

Prints the machine first, then this machine's measured peaks (matmul FLOP/s, memory bandwidth), then each
entry's config and figures. A failing entry is reported with its traceback and the run goes on; the exit
code is 1 when any entry failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import benchmarks
from benchmarks import machine
from benchmarks.registry import REGISTRY, Benchmark, validate_result

DEFAULT_OUT = Path("benchmarks/results")

EPILOG = """\
examples:
  python -m benchmarks.run                        # everything, full sizes
  python -m benchmarks.run --quick --only shapes_render
  python -m benchmarks.run --list

Writes <out>/results.json (machine, peaks, every entry's config/figures/status, timestamp, command line)
and <out>/results.md (the same as markdown tables). Add an entry by creating benchmarks/bench_<topic>.py
with a function decorated by @benchmark("name", help="..."); see benchmarks/README.md.
"""


def discover_entries() -> dict[str, str]:
    """Imports every ``benchmarks/bench_*.py`` so its entries register.

    Returns ``{module name: traceback}`` for the modules that failed to import.
    """
    failures: dict[str, str] = {}
    for module_info in sorted(pkgutil.iter_modules(benchmarks.__path__), key=lambda m: m.name):
        if not module_info.name.startswith("bench_"):
            continue
        module_name = f"benchmarks.{module_info.name}"
        try:
            importlib.import_module(module_name)
        except Exception:
            failures[module_name] = traceback.format_exc()
    return failures


def run_entry(entry: Benchmark, *, quick: bool) -> dict[str, Any]:
    """Runs one entry; a raised exception or malformed result becomes a ``failed`` record, not a crash."""
    record: dict[str, Any] = {"name": entry.name, "help": entry.help}
    start = time.perf_counter()
    try:
        result = validate_result(entry.fn(quick))
    except Exception as error:
        record.update(
            status="failed",
            error=f"{type(error).__name__}: {error}",
            traceback=traceback.format_exc(),
            config={},
            figures={},
            notes="",
        )
    else:
        record.update(status="ok", **result)
    record["seconds"] = time.perf_counter() - start
    return record


def _failed_import_record(module_name: str, trace: str) -> dict[str, Any]:
    last_line = trace.strip().splitlines()[-1]
    return {
        "name": f"import {module_name}",
        "help": "importing the module that registers entries",
        "status": "failed",
        "error": last_line,
        "traceback": trace,
        "config": {},
        "figures": {},
        "notes": "",
        "seconds": 0.0,
    }


# -------------------------------------------------------------------------------------------- formatting


def format_value(value: float) -> str:
    """Four significant digits without exponents for everyday magnitudes; readable in a table."""
    magnitude = abs(value)
    if magnitude == 0 or 1e-3 <= magnitude < 1e15:
        digits = max(0, 3 - int(f"{magnitude:e}".split("e")[1])) if magnitude else 0
        return f"{value:,.{digits}f}"
    return f"{value:.3e}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _config_text(config: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in config.items())


def machine_lines(info: dict[str, Any]) -> list[str]:
    lines = []
    for key, value in info.items():
        if key.endswith("memory_bytes"):
            value = machine.format_bytes(value)
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v!r}" for k, v in value.items())
        lines.append(f"{key}: {value}")
    return lines


def entries_table(entries: list[dict[str, Any]]) -> str:
    """Markdown table ``entry | figure | value | unit | config``; config shown on an entry's first row."""
    rows = ["| entry | figure | value | unit | config |", "|---|---|---:|---|---|"]
    for entry in entries:
        name = _cell(entry["name"])
        if entry["status"] != "ok":
            rows.append(f"| {name} | FAILED | – | – | {_cell(entry['error'])} |")
            continue
        config = _cell(_config_text(entry["config"]))
        for i, (fig_name, fig) in enumerate(entry["figures"].items()):
            rows.append(
                f"| {name} | {_cell(fig_name)} | {format_value(fig['value'])} | {_cell(fig['unit'])} | "
                f"{config if i == 0 else ''} |"
            )
    return "\n".join(rows)


def peaks_table(peaks: dict[str, Any]) -> str:
    rows = ["| peak | value | unit |", "|---|---:|---|"]
    for fig_name, fig in machine.peak_figures(peaks).items():
        rows.append(f"| {fig_name} | {format_value(fig['value'])} | {_cell(fig['unit'])} |")
    return "\n".join(rows)


def results_markdown(record: dict[str, Any]) -> str:
    parts = [
        "# Benchmark results",
        "",
        f"{record['timestamp']} · `{' '.join(record['command'])}` · mode: "
        f"{'quick' if record['quick'] else 'full'}",
        "",
        "## Machine",
        "",
        *(f"- {line}" for line in machine_lines(record["machine"])),
        "",
    ]
    if record["peaks"] is not None:
        parts += ["## Peaks", "", peaks_table(record["peaks"]), ""]
    parts += ["## Entries", "", entries_table(record["entries"]), ""]
    notes = [f"- **{e['name']}**: {e['notes']}" for e in record["entries"] if e.get("notes")]
    if notes:
        parts += ["### Notes", "", *notes, ""]
    return "\n".join(parts)


def write_results(record: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Writes ``results.json`` and ``results.md`` into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    md_path.write_text(results_markdown(record))
    return json_path, md_path


# ------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Measure this machine (hardware, matmul and bandwidth peaks) and run the registered "
        "benchmark entries, printing and writing their figures.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", nargs="+", action="extend", metavar="NAME", help="run only these entries")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--list", action="store_true", help="list the registered entries and exit")
    parser.add_argument("--skip-peaks", action="store_true", help="do not measure matmul/bandwidth peaks")
    parser.add_argument(
        "--matmul-sizes", nargs="+", type=int, metavar="N", help="square matmul sizes for the peaks"
    )
    parser.add_argument("--bandwidth-mib", type=float, help="array size (MiB) for the bandwidth peaks")
    parser.add_argument("--peak-repeats", type=int, help="timed repeats per peak measurement")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = ["python", "-m", "benchmarks.run", *(sys.argv[1:] if argv is None else argv)]

    import_failures = discover_entries()
    if args.list:
        for entry in sorted(REGISTRY.values(), key=lambda e: e.name):
            print(f"{entry.name:24s} {entry.help}")
        for module_name, trace in import_failures.items():
            print(f"{module_name}: FAILED TO IMPORT\n{trace}", file=sys.stderr)
        return 1 if import_failures else 0

    names = args.only or sorted(REGISTRY)
    unknown = [name for name in names if name not in REGISTRY]
    if unknown:
        hint = f"; modules that failed to import: {sorted(import_failures)}" if import_failures else ""
        parser.error(f"unknown entries {unknown}; registered: {sorted(REGISTRY)}{hint}")

    info = machine.machine_info()
    print("== machine")
    print("\n".join(machine_lines(info)), flush=True)

    peaks = None
    if not args.skip_peaks:
        peaks = machine.measure_peaks(
            quick=args.quick,
            matmul_sizes=args.matmul_sizes,
            bandwidth_bytes=int(args.bandwidth_mib * machine.MIB) if args.bandwidth_mib else None,
            repeats=args.peak_repeats,
        )
        print("\n== peaks (median and best of repeats)")
        print(peaks_table(peaks), flush=True)

    entries: list[dict[str, Any]] = []
    if not args.only:  # with --only the user asked for specific entries; broken modules are just a warning
        entries += [_failed_import_record(m, t) for m, t in import_failures.items()]
    for module_name, trace in import_failures.items():
        print(f"\n!! {module_name} failed to import:\n{trace}", file=sys.stderr, flush=True)

    for name in names:
        entry = REGISTRY[name]
        print(f"\n== {name}: {entry.help}", flush=True)
        record = run_entry(entry, quick=args.quick)
        entries.append(record)
        if record["status"] == "ok":
            print(f"config: {_config_text(record['config'])}")
            for fig_name, fig in record["figures"].items():
                print(f"  {fig_name}: {format_value(fig['value'])} {fig['unit']}")
            if record["notes"]:
                print(f"notes: {record['notes']}")
        else:
            print(f"FAILED after {record['seconds']:.1f} s:\n{record['traceback']}", file=sys.stderr)
        sys.stdout.flush()

    record = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "quick": args.quick,
        "machine": info,
        "peaks": peaks,
        "entries": entries,
    }
    json_path, md_path = write_results(record, args.out)
    print("\n== results")
    print(entries_table(entries))
    print(f"\nwrote {json_path} and {md_path}")
    failed = [e["name"] for e in entries if e["status"] != "ok"]
    if failed:
        print(f"{len(failed)} failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    from dalle_jax import hostenv

    hostenv.reexec_with_hugepages()  # the figures are for the configuration the CLI runs in
    sys.exit(main())
