"""Bench report: a llama-bench style rich table per handset, plus bench.json, bench.csv, bench.png."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

EMULATED_NOTE = "EMULATED (qemu on a host, not a phone): timings say nothing about real handsets"
CSV_FIELDS = ["serial", "status", "emulated", "manufacturer", "model", "soc", "abi", "os", "cpu_cores",
              "mem_total_kb", "recipe", "backend", "threads", "prompt_len", "gen_len", "repeat",
              "pp_tok_s_mean", "pp_tok_s_std", "tg_tok_s_mean", "tg_tok_s_std", "ttft_ms_mean", "ttft_ms_std",
              "load_ms_mean", "vision_encode_total_ms_mean", "vision_encode_total_ms_std", "vision_images",
              "peak_rss_kb", "battery_c_max", "thermal_status_max", "error"]


def _pm(stat: dict, digits: int = 2) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def model_label(report: dict) -> str:
    b = report["bundle"]
    q = b.get("quantization") or {}
    scheme = q.get("scheme") if isinstance(q, dict) else None
    return " ".join(x for x in (b.get("recipe") or b["name"], scheme) if x)


def print_tables(report: dict, console: Console) -> None:
    cfg = report["config"]
    for h in report["handsets"]:
        f = h["facts"]
        title = f"{h['serial']}  {f.get('manufacturer') or ''} {f.get('model') or ''}  {f.get('os') or ''}".strip()
        if h["status"] != "ok":
            console.print(f"[bold]{title}[/]\n  [red]FAILED:[/] {h['error']}")
            continue
        freqs = f.get("cpu_max_freq_khz") or []
        temps = [t[k].get("battery_c") for t in h["trials"] for k in ("thermal_before", "thermal_after")]
        temps = [t for t in temps if t is not None]
        facts = (f"{f.get('cpu_cores')} cores" + (f" up to {max(freqs) / 1e6:.2f} GHz" if freqs else "")
                 + (f", {f['mem_total_kb'] / 2**20:.1f} GiB RAM" if f.get("mem_total_kb") else "")
                 + (f", battery {min(temps):.1f}-{max(temps):.1f} C" if temps else ""))
        caption = facts + ("\n[bold yellow]" + EMULATED_NOTE + "[/]" if h["emulated"] else "")
        table = Table(title=title, caption=caption)
        for col in ("model", "SoC", "backend", "threads", "test", "t/s", "TTFT ms"):
            table.add_column(col, justify="right" if col in ("threads", "t/s", "TTFT ms") else "left")
        s = h["summary"]
        common = [model_label(report), f.get("soc_model") or "?", cfg["backend"], str(s.get("threads") or cfg["threads"] or "auto")]
        tag = " (emulated)" if h["emulated"] else ""
        table.add_row(*common, f"pp{cfg['prompt_len']}{tag}", _pm(s["pp_tok_s"]), _pm(s["ttft_ms"]))
        table.add_row(*common, f"tg{cfg['gen_len']}{tag}", _pm(s["tg_tok_s"]), "")
        if s.get("vision_encode_total_ms"):  # --image: TTFT column = vision encode time of all images
            n = len(s["vision_encode_ms"])
            table.add_row(*common, f"vision {n} img{tag}", "", _pm(s["vision_encode_total_ms"], 1))
            table.caption = (caption + f"\nvision encode ms per image (thumbnail, then slices): "
                             + ", ".join(_pm(x, 0) for x in s["vision_encode_ms"])
                             + f"; prompt {s.get('prompt_tokens')} tokens incl. image")
        console.print(table)


def _csv_row(report: dict, h: dict) -> dict:
    f, s, cfg = h["facts"], h["summary"], report["config"]
    temps = [t.get(k, {}).get("battery_c") for t in h["trials"] for k in ("thermal_before", "thermal_after")]
    temps = [t for t in temps if t is not None]
    status = [t.get(k, {}).get("thermal_status") for t in h["trials"] for k in ("thermal_before", "thermal_after")]
    status = [s for s in status if s is not None]
    return {"serial": h["serial"], "status": h["status"], "emulated": h["emulated"],
            "manufacturer": f.get("manufacturer"), "model": f.get("model"), "soc": f.get("soc_model"),
            "abi": f.get("abi"), "os": f.get("os"), "cpu_cores": f.get("cpu_cores"),
            "mem_total_kb": f.get("mem_total_kb"), "recipe": report["bundle"].get("recipe"),
            "backend": cfg["backend"], "threads": s.get("threads") or cfg["threads"],
            "prompt_len": cfg["prompt_len"], "gen_len": cfg["gen_len"], "repeat": cfg["repeat"],
            "pp_tok_s_mean": s["pp_tok_s"]["mean"], "pp_tok_s_std": s["pp_tok_s"]["std"],
            "tg_tok_s_mean": s["tg_tok_s"]["mean"], "tg_tok_s_std": s["tg_tok_s"]["std"],
            "ttft_ms_mean": s["ttft_ms"]["mean"], "ttft_ms_std": s["ttft_ms"]["std"],
            "load_ms_mean": s["load_ms"]["mean"], "peak_rss_kb": s["peak_rss_kb"],
            "vision_encode_total_ms_mean": (s.get("vision_encode_total_ms") or {}).get("mean"),
            "vision_encode_total_ms_std": (s.get("vision_encode_total_ms") or {}).get("std"),
            "vision_images": len(s["vision_encode_ms"]) if s.get("vision_encode_ms") else None,
            "battery_c_max": max(temps) if temps else None,
            "thermal_status_max": max(status) if status else None, "error": h["error"]}


def write_reports(report: dict, out_dir: Path) -> dict[str, Path]:
    """Write bench.json, bench.csv and bench.png into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "csv": out_dir / "bench.csv", "png": out_dir / "bench.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    with open(paths["csv"], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for h in report["handsets"]:
            w.writerow(_csv_row(report, h))
    _chart(report, paths["png"])
    return paths


def _chart(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = report["config"]
    hs = report["handsets"]
    labels = [f"{h['facts'].get('model') or h['serial']}\n{h['serial']}" + ("\n(emulated)" if h["emulated"] else "")
              for h in hs]
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 2.2 * len(hs) + 3), 4.2))
    for ax, key, name in ((axes[0], "pp_tok_s", f"prefill pp{cfg['prompt_len']}"),
                          (axes[1], "tg_tok_s", f"decode tg{cfg['gen_len']}")):
        means = [h["summary"][key]["mean"] or 0 for h in hs]
        stds = [h["summary"][key]["std"] or 0 for h in hs]
        colors = ["#bbbbbb" if h["status"] != "ok" else "#d9a441" if h["emulated"] else "#3b75af" for h in hs]
        ax.bar(range(len(hs)), means, yerr=stds, color=colors, capsize=4)
        for i, h in enumerate(hs):
            if h["status"] != "ok":
                ax.text(i, 0, "failed", ha="center", va="bottom", color="red", rotation=90)
        ax.set_xticks(range(len(hs)), labels, fontsize=7)
        ax.set_ylabel("tokens/s (mean ± std)")
        ax.set_title(name)
    title = f"{model_label(report)}: {cfg['backend']}, {cfg['repeat']} trials"
    if any(h["emulated"] for h in hs):
        title += "\nyellow = EMULATED (qemu), not phone performance"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
