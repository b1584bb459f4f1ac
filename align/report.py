"""The run report: `report.html` (plots embedded as PNG, readable offline) and `report.md`.

Made from the same files every stage writes (`metrics.jsonl`, `align.json`), so it can be
rebuilt at any time with `python -m align.report runs/NAME`. Each stage contributes a
section, in the registry's order (align.artifacts.STAGES), titled by its folder; a stage
that has not run yet is simply absent.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import math
import os
import re
import sys
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote

from align import StageError
from align.artifacts import (
    MANIFEST,
    STAGES,
    _held_elsewhere,
    checkpoint_steps,
    later_rounds,
    parent_path,
    read_manifest,
    resume_key,
    round_root,
    shell,
    stage_dir,
    stages_of_kind,
)

# What each RL stage's logged `kl` is: one name, three quantities. PPO's is align's own (align/recipes/ppo.py), k1 = log
# pi - log ref summed over a response (as eval's KL is); GRPO's and RLOO's are TRL's, a mean over tokens, of k3 =
# ratio - 1 - log ratio (GRPO) or of k1 (RLOO), so about a response's length times smaller than PPO's.
KL_UNITS = {"ppo": ("nats per response", "k1, summed over the response"),
            "grpo": ("nats per token", "k3, TRL's mean over tokens"),
            "rloo": ("nats per token", "k1, TRL's mean over tokens")}

# Which logged keys to plot for a stage, as (title, y-axis label: unit and basis, [keys]); keys missing from the log
# are skipped. A figure logged for training batches and one for the held-out set share an axis: LINES says which is which.
PLOTS: dict[str, list[tuple[str, str, list[str]]]] = {
    "sft": [("Loss", "cross-entropy, nats per token", ["loss", "eval_loss"]),
            ("Learning rate", "learning rate", ["learning_rate"])],
    "reward": [("Loss", "-log sigmoid(reward gap), nats per pair", ["loss", "eval_loss"]),
               # eval_accuracy is align's, over the held-out pairs; TRL's evaluations during training log a mean of
               # per-batch means (align/recipes/reward.py AlignRewardTrainer.log)
               ("Accuracy", "share of pairs ranked right", ["accuracy", "eval_accuracy_batch_mean", "eval_accuracy"])],
    "dpo": [("Loss", "loss per pair (sigmoid DPO: nats)", ["loss", "eval_loss"]),
            ("Implicit rewards", "β × log-ratio to the reference, per answer",
             ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
            # TRL's figures: each logged point a mean of per-batch means (the manifest's held-out accuracy is over pairs)
            ("Accuracy (TRL: mean of per-batch means)", "share of pairs ranked right",
             ["rewards/accuracies", "eval_rewards/accuracies"])],
    "ppo": [("Reward", "score per response (step mean)", ["reward/mean"]),
            ("KL from reference, nats per response (k1 sum)", "nats per response", ["kl"]),
            # beta weighs nats against the score: a coefficient, not nats, so on an axis of its own
            ("KL coefficient β (reward per nat)", "β (reward per nat)", ["kl_coef"]),
            ("Response length", "tokens per response (step mean)", ["length/mean"]),
            ("Entropy", "nats per token", ["entropy"]),
            ("Clipping", "share of tokens clipped; approx KL in nats", ["policy/clipfrac", "value/clipfrac",
                                                                       "policy/approx_kl"]),
            ("Value function", "squared error; explained variance (share)", ["value/loss", "value/explained_variance"])],
    "grpo": [("Reward", "score per completion (step mean)", ["reward"]),
             ("KL from reference, nats per token (k3 mean)", "nats per token", ["kl"]),
             ("Response length", "tokens per completion (step mean)", ["completions/mean_length"])],
    "rloo": [("Reward", "score per completion (step mean)", ["reward"]),
             ("KL from reference, nats per token (k1 mean)", "nats per token", ["kl"]),
             ("Response length", "tokens per completion (step mean)", ["completions/mean_length"])],
}
# A line's name in a plot's legend where the logged key does not say its basis: training figures are each logging
# step's batches, the eval_ ones the held-out set's.
LINES = {"loss": "training batches", "eval_loss": "held-out set", "accuracy": "training batches",
         "eval_accuracy": "held-out set (over pairs)",
         "eval_accuracy_batch_mean": "held-out set (TRL: mean of per-batch means)", "rewards/accuracies": "training batches",
         "eval_rewards/accuracies": "held-out set"}
# Eval's table rows whose figure has a unit or basis its key does not say.
EVAL_ROWS = {"kl": "KL (nats/answer, sampled T=1)", "length": "length (words)",
             "cut": "answers cut at max_new_tokens (share)"}
# a caution when the policies' shares of answers cut at max_new_tokens differ by this much (and one is at least it)
CUT_GAP = 0.10


# Okabe and Ito's colour-blind-safe palette; each line also has its own dash and marker
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")
DASHES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")


def _figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _series(rows: list[dict[str, Any]], keys: list[str]) -> tuple[tuple[str, tuple[tuple[Any, Any], ...]], ...]:
    """(legend name, ((step, value), ...)) for each key with points, named by LINES."""
    series = []
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
               and "step" in r]
        if pts:
            series.append((LINES.get(key, key), tuple(pts)))
    return tuple(series)


def plot_series(title: str, rows: list[dict[str, Any]], keys: list[str], ylabel: str = "") -> str | None:
    """A line plot of each key against step (named in the legend by LINES); None when no key has points."""
    series = _series(rows, keys)
    return _line_plot(title, ylabel, series, _figure_png) if series else None


def series_text(title: str, rows: list[dict[str, Any]], keys: list[str], ylabel: str = "") -> str:
    """What plot_series draws, in words: the plot's alt text and report.md's line for it (a chart was an image
    named 'sft plot' to a screen reader, and absent from report.md). '' when no key has points."""
    said = []
    for label, pts in _series(rows, keys):
        (first_step, first), (last_step, last) = pts[0], pts[-1]
        turns = [f"{word} {_number(float(p[1]))} at step {p[0]}" for word, p in
                 (("lowest", min(pts, key=lambda p: p[1])), ("highest", max(pts, key=lambda p: p[1])))
                 if p[1] not in (first, last)]  # a low or high between the ends, which the ends do not say
        said.append(f"{label} {_number(float(first))} at step {first_step}"
                    + (f" to {_number(float(last))} at step {last_step}" if len(pts) > 1 else "")
                    + (f" ({', '.join(turns)})" if turns else ""))
    return f"{title} ({ylabel}) by step: " + "; ".join(said) if said else ""


# Each stage (and the pipeline, after each stage) rewrites the whole run's report: a pipeline redrew every earlier
# stage's unchanged plots after each stage. A plot is drawn once per process for its points; the renderer is part
# of the key, so one swapped in draws afresh.
@functools.lru_cache(maxsize=256)
def _line_plot(title: str, ylabel: str, series: tuple[tuple[str, tuple[tuple[Any, Any], ...]], ...],
               render: Callable[[Any], str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.0))
    for i, (label, pts) in enumerate(series):
        xs, ys = zip(*pts, strict=True)
        # told apart by line and marker, not colour alone (a colour-blind reader, a grey print)
        ax.plot(xs, ys, color=COLOURS[i % len(COLOURS)], ls=DASHES[i % len(DASHES)], marker=MARKERS[i % len(MARKERS)],
                markersize=3 if len(xs) < 12 else 4, markevery=max(1, len(xs) // 12), label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return render(fig)


def _esc(value: Any) -> str:
    """A manifest's field as HTML text: None as nothing, anything else as its str (html.escape of a None or a
    number, a field an older or hand-edited manifest holds, failed the whole report)."""
    return html.escape("" if value is None else str(value))


def _number(v: float) -> str:
    """A logged float as a person reads it: from 10,000 up to the unit, in full (TRL logs num_tokens as 10700.0; a
    3.4-hour train_runtime), not 1.07e+04; anything else to four significant digits."""
    return f"{v:,.0f}" if abs(v) >= 1e4 and math.isfinite(v) else f"{v:.4g}"  # 12,346 s, not 1.235e+04


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return _number(v)
    return _esc(v)


def _metrics_table(metrics: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{_esc(k)}</td><td>{_fmt(v)}</td></tr>"
        for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
    )
    return f"<table class='kv'>{rows}</table>" if rows else ""


def _md(text: Any) -> str:
    """Text for report.md: its <, > and & as entities, so that a name (a run's or stage folder's, a policy's, an
    annotator's) is shown, never read as HTML by a Markdown viewer (a `<script>` in one ran there); and no link or
    image: "](" and "]:" escaped (an annotator named "![x](https://host/p.png)" made a viewer fetch that image)."""
    return html.escape(str(text), quote=False).replace("](", "]\\(").replace("]:", "]\\:")


def _md_code(text: str) -> str:
    """`text` as a Markdown code span, its fence longer than any run of backticks in it (a backtick in a folder's
    name closed a one-backtick span, and what followed was read as Markdown and HTML)."""
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _md_value(value: Any) -> str:
    return _number(value) if isinstance(value, float) else _md(value)


def _md_marks(text: Any) -> str:
    """`text` as Markdown text: each Markdown mark escaped, its <, > and & as entities (_md)."""
    return _md(re.sub(r"([\\`*_{}\[\]()#+\-.!|~])", r"\\\1", str(text)))


class _Markdown(HTMLParser):
    """A section's HTML (the tables, notes and headings this module writes) as Markdown for report.md: every table
    a Markdown table, each chart its alt text. Its text is unescaped by the parser and escaped again for Markdown
    (_md): model text in a cell (an answer side by side, a probe's pair) stays text, never a link, image or HTML;
    a `|` in it does not split the row, nor a newline end it."""

    BLOCKS = {"p", "li", "h3", "div", "ul", "section", "details", "summary"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self.text: list[str] = []  # the block or cell being read
        self.rows: list[list[str]] | None = None  # the table being read
        self.prefix = ""

    def _flush(self) -> None:
        said = "".join(self.text).strip()
        self.text = []
        if said and self.rows is None:
            self.lines += [f"{self.prefix}{said}", ""]
        self.prefix = ""

    def handle_starttag(self, tag, attrs):
        if self.rows is not None:
            if tag == "tr":
                self.rows.append([])
            elif tag in ("td", "th"):
                self.text = []
            elif tag == "br":
                self.text.append("<br>")
            elif tag == "b":
                self.text.append("**")
            return
        if tag == "table":
            self._flush()
            self.rows = []
        elif tag in self.BLOCKS:
            self._flush()
            self.prefix = {"li": "- ", "h3": "### "}.get(tag, "")
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt:
                self._flush()
                self.lines += [f"- figure: {_md(alt)}", ""]
        elif tag == "b":
            self.text.append("**")

    def handle_endtag(self, tag):
        if self.rows is not None:
            if tag in ("td", "th") and self.rows:
                self.rows[-1].append("".join(self.text).strip())
                self.text = []
            elif tag == "b":
                self.text.append("**")
            elif tag == "table":
                rows, self.rows = [r for r in self.rows if r], None
                if rows:
                    width = max(len(r) for r in rows)
                    rows = [r + [""] * (width - len(r)) for r in rows]
                    self.lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * width,
                                   *("| " + " | ".join(r) + " |" for r in rows[1:]), ""]
            return
        if tag in self.BLOCKS:
            self._flush()
        elif tag == "b":
            self.text.append("**")

    def handle_data(self, data):
        # a backslash or backtick is text (a backtick opened a code span, in which the escapes below showed as
        # typed: an answer's code read `&lt;b&gt;`); no bare URL, www. name or address becomes GitHub's autolink
        said = _md(data.replace("\\", "\\\\").replace("`", "\\`"))
        said = said.replace("://", "&#58;//").replace("www.", "www&#46;").replace("@", "&#64;")
        if self.rows is not None:  # a cell: one line, its bars not the table's
            said = said.replace("|", "\\|").replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")
        else:
            said = re.sub(r"\s+", " ", said)
        self.text.append(said.replace("$", "\\$"))  # GitHub reads $...$ as math: "$60 ... $5" in an answer was one


def markdown_of(section_html: str) -> str:
    """`section_html` (a SECTIONS function's) as Markdown (_Markdown)."""
    parser = _Markdown()
    parser.feed(section_html)
    parser.close()
    parser._flush()
    return "\n".join(parser.lines)


def _no_math(text: str) -> str:
    return text.replace("$", r"\$")


def interval_method(manifest: dict[str, Any]) -> str:
    """How an eval's win-rate intervals were made, as its manifest records it (`interval`), as the title's
    "95% ... interval" words. An eval from before it recorded one made them by bootstrap over prompts, or (from
    ca3f2c8) by Wilson's score interval: Wilson where every interval is Wilson's for its win-rate and the
    manifest's `prompts`, else no method ("")."""
    if manifest.get("interval"):
        method = str(manifest["interval"])
        return {"wilson": "Wilson"}.get(method, method)
    from align.evaluation import wilson_interval

    n = manifest.get("prompts")
    pairs = [(row[k[:-len("_ci")]], row[k]) for row in (manifest.get("policies") or {}).values()
             if isinstance(row, dict) for k in row if k.endswith("/win_rate_ci") and k[:-len("_ci")] in row]
    try:
        wilson = bool(pairs) and bool(n) and all(
            abs(a - b) < 1e-6 for p, ci in pairs for a, b in zip(wilson_interval(float(p), float(n)), ci, strict=True))
    except (TypeError, ValueError):
        wilson = False
    return "Wilson" if wilson else ""


def eval_section(folder: Path, manifest: dict[str, Any]) -> str:
    """Win-rates with intervals (a bar chart), the per-policy table, and answers side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table: dict[str, dict[str, Any]] = manifest.get("policies", {})
    baseline = manifest.get("baseline", "sft")
    parts = []
    # Names as plain text: matplotlib reads "$...$" as math, and a name it cannot parse fails the section
    reads = {(p, k): judged(manifest, row, k) for p, row in table.items() for k in row
             if k.endswith("/win_rate") and isinstance(row[k], (int, float))}
    named = [(f"{p} · {k.split('/')[0]}" + (f" ({_ties(read['ties'])})" if read["ties"] is not None else ""),
              table[p][k], read["ci"]) for (p, k), read in reads.items() if read["ci"]]
    bars = [(_no_math(label), value, ci) for label, value, ci in named]
    prompts = {read["prompts"] for read in reads.values()}
    if bars:
        fig, ax = plt.subplots(figsize=(6.0, 0.5 + 0.55 * len(bars)))
        labels, values, cis = zip(*bars, strict=True)
        err = [[v - lo for v, (lo, _) in zip(values, cis, strict=True)],
               [hi - v for v, (_, hi) in zip(values, cis, strict=True)]]
        ax.barh(labels, values, xerr=err, color=COLOURS[0], capsize=4)
        ax.axvline(0.5, color="#999", ls="--", lw=1)
        ax.set_xlim(0, 1)
        # the dashed line's meaning in the axis label (a note drawn at its top overlapped the title)
        ax.set_xlabel("win-rate: share of prompts won (a tie counts half); dashed: 0.5, no difference")
        over = f" {over_prompts(prompts.pop())}" if len(prompts) == 1 else ""
        title = f"Win-rate against {baseline}{over} (95% {(interval_method(manifest) + ' ').lstrip()}interval)"
        ax.set_title(_no_math(title))
        said = "; ".join(f"{label} {value:.1%}{_interval(ci)}" for label, value, ci in named)
        parts.append(f"<div class='plots'><img alt='win-rate: {_esc(title)}: {_esc(said)} (0.5: no difference)' "
                     f"src='data:image/png;base64,{_figure_png(fig)}'></div>")
    # A row per figure, a column per policy (a handful of policies, a dozen figures): win-rates first, then KL
    # (a win-rate's wins, ties and losses in its cell)
    keys = sorted({k for row in table.values() for k in row if not k.endswith("_ci") and k.split("/")[-1] not in COUNTS},
                  key=lambda k: (not k.endswith("/win_rate"), k != "kl", k))

    def cell(row: dict[str, Any], key: str) -> str:
        if key not in row:
            return ""
        if key.endswith("/win_rate") and isinstance(row[key], (int, float)):
            counts = [row.get(f"{key[:-len('/win_rate')]}/{c}") for c in COUNTS]
            return f"<b>{row[key]:.1%}</b>{_interval(row.get(key + '_ci'))}" + (
                " · {} won, {} tied, {} lost".format(*counts) if all(isinstance(c, int) for c in counts) else "")
        if key == "cut" and isinstance(row[key], (int, float)):
            return f"{row[key]:.0%}"
        return _fmt(row[key])

    head = "".join(f"<th>{_esc(p)}</th>" for p in table)
    body = "".join(f"<tr><td>{_esc(EVAL_ROWS.get(k, k))}</td>"
                   + "".join(f"<td>{cell(row, k)}</td>" for row in table.values())
                   + "</tr>" for k in keys)
    parts.append(f"<table><tr><th>figure</th>{head}</tr>{body}</table>")
    board = (manifest.get("human") or {}).get("leaderboard")
    if board:
        rows = "".join(f"<tr><td>{_esc(b['policy'])}</td><td>{b['rating']:.0f}</td>"
                       f"<td>[{b['ci'][0]:.0f}, {b['ci'][1]:.0f}]</td></tr>" for b in board)
        parts.append(f"<h3>Human arena (Bradley-Terry; {_esc(baseline)} = 1000; "
                     f"{_esc(verdicts(manifest['human']))})</h3><table><tr><th>policy</th><th>rating</th>"
                     f"<th>95% interval</th></tr>{rows}</table>")
    samples = []
    if (folder / "samples.jsonl").is_file():  # a line that cannot be read loses the answers only, not the figures
        try:
            samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()[:6]]
            samples = [x for x in samples if isinstance(x, dict) and isinstance(x.get("prompt"), str)]
        except ValueError as err:
            parts.append(f"<p class='meta'>samples.jsonl cannot be read ({_esc(err)}): no answers shown.</p>")
    if samples:
        names = list(table)
        head = "".join(f"<th>{_esc(n)}</th>" for n in names)
        rows = "".join("<tr><td>" + _esc(s["prompt"]) + "</td>" + "".join(
            f"<td>{_esc(s.get(n, ''))}</td>" for n in names) + "</tr>" for s in samples)
        parts.append(f"<h3>Answers side by side</h3><table class='samples'><tr><th>prompt</th>{head}</tr>{rows}</table>")
    return "".join(parts)


def reward_section(folder: Path, manifest: dict[str, Any]) -> str:
    """Calibration (accuracy per reward-gap bin against what the rewards predict) and warnings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = manifest.get("metrics", {})
    parts = []
    bins = m.get("calibration") or []
    if bins:
        fig, ax = plt.subplots(figsize=(5.2, 3.0))
        xs = range(len(bins))
        ax.bar([x - 0.2 for x in xs], [b["accuracy"] for b in bins], width=0.4, color=COLOURS[0],
               label="held-out accuracy")
        ax.bar([x + 0.2 for x in xs], [b["predicted"] for b in bins], width=0.4, color="white", edgecolor=COLOURS[1],
               hatch="///", label="predicted (sigmoid of gap)")  # hatched: told apart without colour
        ax.set_xticks(list(xs), [f"{b['gap_min']:.2f}–{b['gap_max']:.2f}\n{b['pairs']} pairs" for b in bins],
                      fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("|reward gap| bin")
        ax.set_ylabel("share of held-out pairs ranked right")
        ax.set_title("Reward model calibration")
        ax.legend(fontsize=8)
        said = "; ".join(f"gap {b['gap_min']:.2f}–{b['gap_max']:.2f} ({b['pairs']} pairs): {b['accuracy']:.0%} ranked "
                         f"right, {b['predicted']:.0%} predicted" for b in bins)
        parts.append(f"<div class='plots'><img alt='calibration: held-out accuracy against what the reward gap "
                     f"predicts, by |reward gap| bin: {_esc(said)}' src='data:image/png;base64,{_figure_png(fig)}'></div>")
    notes = []
    if isinstance(m.get("eval_accuracy"), float):
        ceiling, posterior = m.get("agreement_ceiling"), m.get("posterior_ceiling")
        buckets = ((manifest.get("probes") or {}).get("by_agreement") or {}).get("buckets") or []
        if buckets and {b["bucket"] for b in buckets} == {"single annotator"}:
            ceiling = None  # one annotator per pair agrees with itself: 100 %, no ceiling (the probes say so)
        notes.append(f"Held-out pairwise accuracy <b>{m['eval_accuracy']:.1%}</b>{_interval(m.get('eval_accuracy_ci'))} "
                     f"on {_esc(m.get('eval_pairs', '?'))} pairs"
                     + (f" from {_esc(m['eval_prompts'])} prompts (the interval counts prompts, not pairs, as independent)" if "eval_prompts" in m else "")
                     + (f" against the labels' picks (their mean posterior, how often a pick is itself right: {posterior:.1%}; "
                        f"annotator agreement {ceiling:.1%})" if isinstance(posterior, float) and isinstance(ceiling, float) else
                        f" against the labels' picks (their mean posterior, how often a pick is itself right: {posterior:.1%})"
                        if isinstance(posterior, float) else
                        f" (annotator agreement: {ceiling:.1%}; not a ceiling: a majority of several annotators is right more "
                        "often than two of them agree)" if isinstance(ceiling, float) else ""))
    r = m.get("length_correlation")
    if isinstance(r, float):
        warn = abs(r) > 0.5
        notes.append(f"{'<b>Warning</b>: ' if warn else ''}reward vs response length: Pearson r = {r:.2f}"
                     + (f" (the model may reward {'longer' if r > 0 else 'shorter'} answers, which a policy can "
                        "exploit)" if warn else ""))
    if notes:
        parts.append("<ul>" + "".join(f"<li>{n}</li>" for n in notes) + "</ul>")
    if manifest.get("probes"):
        parts.append(probes_html(manifest["probes"]))
    return "".join(parts)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{'' if v is None else _fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return "<table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + f"</tr>{cells}</table>"


def _rate(value: Any) -> str:
    return "" if value is None else f"{value:.0%}"


def probes_html(probes: dict[str, Any]) -> str:
    """The reward stage's probes (align.reward_model.probe): accuracy by agreement, margin and posterior,
    and each edit of the rejected response with its flip rate and reward gain (and the labelling scorer's)."""
    parts = ["<h3>Probes</h3>"]
    splits = [("annotator agreement", probes["by_agreement"]["buckets"]), ("labelling margin", probes.get("by_margin")),
              ("posterior P(chosen better)", probes.get("by_posterior"))]
    for name, buckets in splits:
        if buckets:
            parts.append(f"<p>Held-out accuracy by {name}:</p>"
                         + _table(["bucket", "pairs", "accuracy"], [[b["bucket"], b["pairs"], _rate(b["accuracy"])]
                                                                   for b in buckets]))
    if probes["by_agreement"].get("note"):
        parts.append(f"<p class='meta'>{_esc(probes['by_agreement']['note'])}</p>")
    scorer = probes.get("scorer")
    head = ["probe", "edit of the rejected answer", "gated", "flips", "flip rate", "reward gain", "gain / mean gap"]
    if scorer:
        head += [f"{scorer}: flips (of the pairs it orders as labelled)", f"{scorer}: gain",
                 f"flips {scorer} does not make"]
    rows = []
    for e in probes["edits"]:
        row = [e["edit"], e["what"], "yes" if e["gated"] else "no", f"{e['flips']} of {e['of']}", _rate(e["flip_rate"]),
               e["mean_gain"], e["gain_vs_gap"]]
        if scorer:
            of = e.get("scorer_of")  # the model's rate is over the pairs it had right, the scorer's over these
            said = f"{e['scorer_flips']} of {of} ({_rate(e.get('scorer_flip_rate'))})" if isinstance(of, int) and \
                "scorer_flips" in e else _rate(e.get("scorer_flip_rate"))
            row += [said, e.get("scorer_mean_gain"), _rate(e.get("unsupported_flip_rate"))]
        rows.append(row)
    parts.append(_table(head, rows))
    gate = probes.get("gate")
    if gate:
        parts.append(f"<p>Gate (PPO refuses above <code>max_probe_flip_rate</code>, 0.25 by default; DPO warns): the "
                     f"worst end-appended probe is <b>{_esc(gate['edit'])}</b> at <b>{gate['rate']:.0%}</b> "
                     f"({_esc(gate['flips'])} of {_esc(gate['of'])} pairs; {_esc(gate['basis'])}).</p>")
    return "".join(parts)


def reliability_html(reliability: dict[str, Any]) -> str:
    """The export's per-annotator reliability (align.labeling.agreement.dawid_skene) as a table."""
    people = reliability.get("annotators") or {}
    # unchecked (no other annotator on its tasks, no gold answer): its accuracy is the prior, not a measurement
    rows = [[name, f"{r['accuracy']:.2f} (the prior: unchecked)" if not r["checked"] and not r["gold"]
             else r["accuracy"], f"{r['interval'][0]:.2f}–{r['interval'][1]:.2f}", r["weight"], r["judgements"],
             r["checked"], r["gold"], r.get("gold_accuracy")] for name, r in people.items()]
    used = "used to decide the pairs (combine=dawid_skene)" if reliability.get("used_for_pairs") else \
        "measured, not used (combine=dawid_skene would use it)"
    prior = reliability.get("prior") or {}
    return (f"<h3>Annotator reliability</h3><p class='meta'>{_esc(reliability.get('model', ''))}; {used}; "
            f"prior accuracy {_esc(prior.get('accuracy'))} worth {_esc(prior.get('strength'))} judgements. An annotator "
            "nobody else (nor a gold answer) checked keeps the prior.</p>"
            + "".join(f"<p><b>Warning</b>: {_esc(w)}</p>" for w in reliability.get("warnings") or [])
            + _table(["annotator", "est. accuracy", "95% interval", "vote weight", "judgements", "checked", "gold",
                      "right on gold"], rows))


def preferences_section(folder: Path, manifest: dict[str, Any]) -> str:
    """The preference data: how many rankings, pairs and annotators, and what was dropped."""
    summary = manifest.get("summary") or {}
    annotators = summary.get("annotators") or summary.get("per_annotator")
    parts = []
    if isinstance(annotators, dict) and annotators:
        rows = "".join(f"<tr><td>{_esc(str(a))}</td><td>{_fmt(n)}</td></tr>" for a, n in annotators.items())
        parts.append(f"<h3>Annotators</h3><table><tr><th>annotator</th><th>rankings</th></tr>{rows}</table>")
        if len(annotators) == 1:  # its mean_agreement of 1 (below) is one annotator agreeing with itself
            parts.append("<p class='meta'>One annotator: agreement between annotators is not measured here "
                         "(mean_agreement is 1 by definition); rank some tasks by two (align label --overlap 2) to "
                         "measure it.</p>")
    if summary.get("reliability"):
        parts.append(reliability_html(summary["reliability"]))
    pairs = []
    try:
        from datasets import load_from_disk

        ds = load_from_disk(str(folder))
        seen = set()
        for pair in ds["train"]:  # one pair of each of the first three prompts (a ranking's pairs come together)
            if pair["prompt"][-1]["content"] not in seen:
                seen.add(pair["prompt"][-1]["content"])
                pairs.append(pair)
            if len(pairs) == 3:
                break
    except Exception:  # noqa: BLE001 - the report shows what it can
        pass
    if pairs:
        rows = "".join(
            f"<tr><td>{_esc(p['prompt'][-1]['content'])}</td><td>{_esc(p['chosen'][-1]['content'])}</td>"
            f"<td>{_esc(p['rejected'][-1]['content'])}</td></tr>" for p in pairs)
        parts.append("<h3>Example pairs</h3><table class='samples'><tr><th>prompt</th><th>chosen</th>"
                     f"<th>rejected</th></tr>{rows}</table>")
    return "".join(parts)


def _manifest(folder: Path) -> dict[str, Any] | None:
    """`folder`'s manifest, or None where it has none or one that cannot be read (half a file): not finished."""
    try:
        return read_manifest(folder)
    except (FileNotFoundError, StageError):
        return None


def headline(run_dir: Path) -> str:
    """The answer first: did the aligned policy beat the baseline, by how much, how sure. An eval manifest of
    another shape (another align version's, edited by hand) says so there instead of failing the report."""
    path = stage_dir(run_dir, "eval") / MANIFEST
    m = _manifest(path.parent)
    if m is None:
        if path.parent.is_dir() and not path.is_file():  # a rerun that failed or stopped took its verdict with it
            return (f"<div class='headline'><ul><li>No verdict: {_esc(path.parent.name)}/ has no {MANIFEST} (its "
                    f"last run stopped or failed, or it is running now): run align eval again</li></ul></div>")
        return ""
    try:
        return _headline(m, path.parent)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        return (f"<div class='headline'><ul><li>eval's verdicts could not be read from its {MANIFEST} "
                f"({_esc(repr(err))}): run align eval again</li></ul></div>")


def _headline(m: dict[str, Any], folder: Path) -> str:
    changed = changed_parents(m, folder)  # a verdict on a policy (or by a judge) remade since is not its own
    weak_judge = judge_caution(m, folder)
    items = []
    said_interval = f" (95% {(interval_method(m) + ' ').lstrip()}interval)"  # the plot's title says it the same way
    for name, row in (m.get("policies") or {}).items():
        for key, value in row.items():
            if key.endswith("/win_rate") and isinstance(value, (int, float)):
                read = judged(m, row, key)
                lo, hi = read["ci"] or (0.5, 0.5)  # no interval (an eval that recorded none): no verdict either
                stale = [f"eval measured an earlier {n}; its folder {since}" for n, (_, since) in changed.items()
                         if n in (name, m.get("baseline"), key[:-9])]
                if key == "reward_model/win_rate" and weak_judge:
                    stale.append(weak_judge)
                # the sign test said, where it alone keeps the interval from deciding (4 wins of 4: p 0.125)
                undecided = read["verdict"].startswith("is not") and (lo > 0.5 or hi < 0.5)
                items.append(f"<li><b>{_esc(name)}</b> {read['verdict']} <b>{_esc(m.get('baseline', ''))}</b> "
                             f"judged by {_esc(key[:-9])}: win-rate <b>{value:.1%}</b>"
                             f"{_interval(read['ci'])}{said_interval if read['ci'] else ''} {over_prompts(read['prompts'], read['ties'])}"
                             + (f", sign test p = {read['p']:.3g}" if undecided else "")
                             + (f" · KL {row['kl']:.2f} nats per answer" if row.get("kl") is not None else "")
                             + (f" · <b>caution</b>: {_esc('; '.join(stale))}" if stale else "")
                             + "</li>")
    board, baseline = m.get("human"), m.get("baseline", "")
    if isinstance(board, dict):  # people's verdicts: a rating with its interval, over how many verdicts
        rated = [r for r in board.get("leaderboard") or [] if r["policy"] != baseline]
        items += [f"<li><b>{_esc(r['policy'])}</b> vs <b>{_esc(baseline)}</b> judged by people (blind A/B, "
                  f"{_esc(verdicts(board))}): Bradley-Terry rating <b>{r['rating']:.0f}</b>"
                  " [{:.0f}, {:.0f}]".format(*r["ci"]) + f" against {_esc(baseline)}'s 1000</li>" for r in rated]
        if not board.get("leaderboard"):
            items += [f"<li>{_esc(line)}</li>" for line in human_lines(m)]
    return f"<div class='headline'><ul>{''.join(items)}</ul></div>" if items else ""


def _headline_md(run_dir: Path) -> str:
    """The headline as report.md's lines: its markup gone, its text as text (_md)."""
    text = headline(run_dir).replace("<li>", "- ").replace("</li>", "\n")
    return _md(html.unescape(re.sub(r"<[^>]+>", "", text))) + "\n"


def active_learning_section(folder: Path, manifest: dict[str, Any]) -> str:
    """benchmarks/active_learning.py's curve (accuracy vs labelled tasks, active vs random) and its table."""
    parts = []
    png = folder / str(manifest.get("figure") or "curve.png")
    # a figure of the folder's own: "../" or an absolute path in a manifest from elsewhere embedded any file here
    if png.is_file() and png.resolve().is_relative_to(folder.resolve()):
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(f"<div class='plots'><img alt='active learning curve' src='data:image/png;base64,{data}'></div>")
    curve = json.loads((folder / "curve.json").read_text()) if (folder / "curve.json").is_file() else {}
    table = curve.get("curve") or {}
    arms = list(next(iter(table.values()), {}))
    if table:
        head = "".join(f"<th>{_esc(a)}</th>" for a in arms)
        body = "".join(f"<tr><td>{_esc(n)}</td>" + "".join(
            f"<td>{row[a]['accuracy']:.3f} [{row[a]['ci'][0]:.3f}, {row[a]['ci'][1]:.3f}]"
            + (f" ({row[a]['delta']:+.3f})" if "delta" in row[a] else "") + "</td>" for a in arms) + "</tr>"
            for n, row in table.items())
        s = curve.get("settings", {})
        parts.append(f"<p>Held-out pairwise accuracy of the reward model after n labelled tasks ({_esc(curve.get('test_pairs'))} "
                     f"test pairs, {_esc(s.get('seeds'))} seeds, 95% bootstrap interval; in brackets after it, the "
                     f"difference from random).</p><table><tr><th>tasks</th>{head}</tr>{body}</table>")
    return "".join(parts)


def _num(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _interval(ci: Any) -> str:
    """' [lo%, hi%]' for a manifest's 95 % interval, '' when it has none."""
    return " [{:.1%}, {:.1%}]".format(*ci) if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""


COUNTS = ("wins", "ties", "losses")  # eval's per-judge counts beside each win-rate (`<judge>/wins`, ...)


def near_chance(m: dict[str, Any], key: str) -> str | None:
    """For an accuracy (`key`, with its `key`_ci) no better than a coin: "63.6% [49.1%, 76.0%], which does not rule
    out chance" where its 95% interval holds 50%, "30.0% [20.0%, 40.0%], below chance (the worse answer preferred
    more often than not)" where it lies under 50%; else None (and for an interval that is not two numbers)."""
    value, ci = _num(m, key), m.get(key + "_ci")
    if value is None or not (isinstance(ci, (list, tuple)) and len(ci) == 2
                             and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in ci)):
        return None
    if ci[1] < 0.5:
        return f"{value:.1%}{_interval(ci)}, below chance (the worse answer preferred more often than not)"
    if ci[0] <= 0.5:
        return f"{value:.1%}{_interval(ci)}, which does not rule out chance (50%)"
    return None


def dpo_did_not_move(manifest: dict[str, Any]) -> list[str]:
    """A caution for a DPO whose policy did not move toward the preferred answers: a held-out implicit reward
    margin at or below 0 (beta times how much the chosen-minus-rejected log-prob margin grew over the SFT's), or,
    with no held-out pairs, a sigmoid loss whose run average stayed at ln 2 (its value at step 0, where the
    policy is the reference). The accuracy caution misses both when the held-out pairs are few or absent."""
    m = manifest.get("metrics") or {}
    remedy = "raise train.lr or train.max_steps (or beta), and check that the labels prefer what they should"
    margin = _num(m, "heldout_reward_margin")
    if margin is not None and margin <= 0:
        sft, dpo = _num(m, "heldout_logp_margin_sft"), _num(m, "heldout_logp_margin_dpo")
        moved = f" (log-prob margin {sft:.2f} for SFT, {dpo:.2f} after)" if sft is not None and dpo is not None else ""
        return [f"its held-out implicit reward margin is {margin:.3f}{moved}: on pairs it did not train on, the "
                f"policy moved no closer to the preferred answers than the SFT: {remedy}"]
    loss = _num(m, "train_loss")
    sigmoid = ((manifest.get("config") or {}).get("loss") or "sigmoid") == "sigmoid"
    if margin is None and sigmoid and loss is not None and abs(loss - math.log(2)) < 0.002:
        return [f"its training loss averaged {loss:.4f}, DPO's value at step 0 (ln 2 = 0.6931): the policy has "
                f"not moved from the SFT on the pairs it trained on: {remedy}"]
    return []


def judging_reward_model(m: dict[str, Any], folder: Path) -> Path | None:
    """The folder of the reward model that judged the eval in `folder` (its parent reward_model), where recorded."""
    parent = (m.get("parents") or {}).get("reward_model")
    if not isinstance(parent, dict) or not parent.get("path"):
        return None
    return parent_path(parent["path"], folder, m)


def judge_caution(m: dict[str, Any], folder: Path) -> str | None:
    """Why the reward_model judge of the eval in `folder` says little: its held-out accuracy does not rule out
    chance. A verdict "beats" by such a judge led a report (86.5% by a reward model at 63.6% [49.1%, 76.0%])."""
    where = judging_reward_model(m, folder)
    if where is None or "reward_model" in changed_parents(m, folder):  # remade since: the stale caution says so
        return None
    said = near_chance((_manifest(where) or {}).get("metrics") or {}, "eval_accuracy")
    return (f"the reward model judging it ({where.parent.name}/{where.name}) ranks held-out pairs at {said}: its "
            "win-rates say little") if said else None


def over_prompts(prompts: Any, ties: Any = None) -> str:
    """What a win-rate is over, for every line that gives one: 'over 48 prompts (1 tie)'; without a tie count
    (an eval from before it recorded its counts), the prompts alone; '' without either."""
    if not isinstance(prompts, int):
        return ""
    return f"over {prompts} prompts" + (f" ({_ties(ties)})" if isinstance(ties, int) else "")


def _ties(n: int) -> str:
    return f"{n} tie{'' if n == 1 else 's'}"


def verdicts(board: dict[str, Any]) -> str:
    """How many A/B verdicts eval's human board counts (how many of them ties: all ties rate every policy 1000
    with an interval of one point, which reads as certainty), and those on earlier versions it did not."""
    n, stale, ties = board.get("comparisons") or 0, board.get("stale_comparisons") or 0, board.get("ties")
    tied = ("" if not isinstance(ties, int) or not ties else ", all ties: no preference either way" if ties == n
            else f", {ties} tie{'' if ties == 1 else 's'}")
    return (f"{n} verdict{'' if n == 1 else 's'}{tied}"
            + (f", {stale} on earlier versions not counted" if stale else ""))


def human_lines(manifest: dict[str, Any]) -> list[str]:
    """Eval's human board in plain text, for the first screen and report.md: the ratings with their verdict count
    (or that there are no verdicts yet); [] for an eval without human=true."""
    board, baseline = manifest.get("human"), manifest.get("baseline", "")
    if not isinstance(board, dict):
        return []
    if not board.get("leaderboard"):
        return [f"human A/B ({verdicts(board)}): no ratings yet; annotators judge the A/B tasks in align label"]
    rated = [r for r in board["leaderboard"] if r["policy"] != baseline]  # the baseline is 1000, its interval a point
    return [f"human A/B ({verdicts(board)}): " + ", ".join("{} {:.0f} [{:.0f}, {:.0f}]".format(
        r["policy"], r["rating"], *r["ci"]) for r in rated) + f" (Bradley-Terry, {baseline} = 1000)"]


def judged(manifest: dict[str, Any], row: dict[str, Any], key: str) -> dict[str, Any]:
    """A win-rate's reading (`key` = '<judge>/win_rate' of a policy's `row`): its prompts, ties (None when the
    eval did not count them), sign-test p, interval (`ci`) and verdict (align.evaluation.verdict: the one
    place its words are decided). Without counts, the p is the largest that the win-rate and prompts allow;
    without an interval (None, or none recorded), no verdict: "vs"."""
    from align.evaluation import sign_test, sign_test_bound, verdict

    judge = key[:-len("/win_rate")]
    counts = [row.get(f"{judge}/{c}") for c in COUNTS]
    if all(isinstance(c, int) for c in counts):
        wins, ties, losses = counts
        prompts, p = wins + ties + losses, sign_test(wins, losses)
    else:
        prompts, ties = manifest.get("prompts"), None
        p = sign_test_bound(float(row[key]), prompts) if isinstance(prompts, int) else 1.0
    ci = row.get(key + "_ci")
    if not (isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(x, (int, float)) for x in ci)):
        return {"prompts": prompts, "ties": ties, "p": p, "verdict": "vs", "ci": None}  # no interval: no verdict
    return {"prompts": prompts, "ties": ties, "p": p, "verdict": verdict(ci, p), "ci": tuple(ci)}


def _steps(m: dict[str, Any]) -> str | None:
    steps, runtime = _num(m, "global_step") or _num(m, "steps"), _num(m, "train_runtime")
    if steps is None:
        return None
    if runtime is not None and "train_loss_since_resume" in m:  # the Trainer's time is the resumed process's
        return f"{steps:.0f} steps, resumed from a checkpoint ({runtime:.0f} s since)"
    return f"{steps:.0f} steps" + (f" in {runtime:.0f} s" if runtime is not None else "")


def glance(kind: str, manifest: dict[str, Any]) -> list[str]:
    """A stage's outcome in a few plain-text figures, for the report's "at a glance" table; [] for a kind it
    does not know (a merge) or a manifest without the figures."""
    m = manifest.get("metrics") or {}
    out: list[str | None] = []
    if kind == "sft":
        loss, accuracy = _num(m, "eval_loss"), _num(m, "eval_mean_token_accuracy")
        out = [f"held-out loss {loss:.3f}" + (f" (next-token accuracy {accuracy:.1%})" if accuracy is not None else "")
               if loss is not None else None, _steps(m)]
    elif kind == "sample":
        answers, prompts, cut = _num(m, "responses_sampled"), _num(m, "new_tasks"), _num(m, "responses_cut")
        candidates = _num(m, "selection/candidates")  # selection=uncertainty: answers sampled for every candidate
        tasks, held, held_cut = _num(m, "tasks_in_batch"), _num(m, "answers_in_batch"), _num(m, "cut_in_batch")
        batch = f"batch {manifest.get('batch') or '?'} holds {tasks:.0f} tasks, {held:.0f} answers" \
            + (f", {held_cut / held:.0%} cut" if held and held_cut is not None else "") if tasks and held else None
        if not answers and batch:  # the same sample run again: nothing new, the batch as it was
            return ["no new answers", batch]
        if answers is not None and prompts is not None:
            out.append(f"{prompts:.0f} prompts chosen from {candidates:.0f} candidates ({answers:.0f} answers sampled)"
                       if candidates else f"{answers:.0f} answers to {prompts:.0f} prompts")
        if cut and answers:
            out.append(f"{cut:.0f} ({cut / answers:.0%}) cut at max_new_tokens")
        if batch and held != answers:  # added to a batch that held answers before
            out.append(batch)
    elif kind == "export":
        pairs, rankings = _num(m, "pairs"), _num(m, "rankings")
        train, test = _num(m, "train_pairs"), _num(m, "test_pairs")
        if pairs is not None:
            out.append(f"{pairs:.0f} pairs" + (f" from {rankings:.0f} rankings" if rankings is not None else "")
                       + (f": {train:.0f} to train, {test:.0f} held out" if train is not None and test is not None else ""))
        dropped = [f"{_num(m, k):.0f} {k.removeprefix('dropped_').replace('_', ' ')}"
                   for k in ("dropped_ties", "dropped_flagged", "dropped_unsafe", "dropped_low_agreement",
                             "dropped_duplicates", "dropped_empty", "dropped_uncertain") if _num(m, k)]
        if dropped:
            out.append("dropped: " + ", ".join(dropped))
        if _num(m, "flagged_pairs"):  # kept (export.flagged=keep): said, as they may be filtered out on `flag`
            out.append(f"{_num(m, 'flagged_pairs'):.0f} pairs from rankings flagged as a whole, all-bad or unsafe "
                       "naming no reply (column flag)")
        if _num(m, "unsafe_pairs"):  # export.unsafe_rule: a reply flagged unsafe put on the rejected side
            out.append(f"{_num(m, 'unsafe_pairs'):.0f} pairs with a reply flagged unsafe as the rejected side "
                       f"({_num(m, 'unsafe_overridden') or 0:.0f} against the ranks)")
    elif kind == "reward":
        accuracy, pairs, prompts = _num(m, "eval_accuracy"), _num(m, "eval_pairs"), _num(m, "eval_prompts")
        if accuracy is not None:
            out.append(f"held-out accuracy {accuracy:.1%}" + _interval(m.get("eval_accuracy_ci"))
                       + (f" on {pairs:.0f} pairs" if pairs is not None else "")
                       + (f" from {prompts:.0f} prompts" if prompts is not None else ""))
        gate = (manifest.get("probes") or {}).get("gate")
        if gate:
            out.append(f"worst probe {gate['edit']}: {gate['rate']:.0%} of the {gate['of']} pairs it had right flip")
        out.append(_steps(m))
    elif kind == "dpo":
        accuracy, margin = _num(m, "heldout_accuracy"), _num(m, "heldout_reward_margin")
        pairs, prompts = _num(m, "heldout_pairs"), _num(m, "heldout_prompts")
        if accuracy is not None:
            out.append(f"held-out preference accuracy {accuracy:.1%}" + _interval(m.get("heldout_accuracy_ci"))
                       + (f" on {pairs:.0f} pairs" if pairs is not None else "")
                       + (f" from {prompts:.0f} prompts" if prompts is not None else "")
                       + (f" (implicit reward margin {margin:.3f})" if margin is not None else ""))
        elif _num(m, "eval_rewards/accuracies") is not None:  # a manifest from before the figures over pairs
            out.append(f"held-out preference accuracy {_num(m, 'eval_rewards/accuracies'):.1%} (TRL's mean of "
                       "per-batch means, not over pairs)")
        out.append(_steps(m))
    elif kind in ("ppo", "grpo", "rloo"):
        first, last = _num(m, "reward_mean_first"), _num(m, "reward_mean") if kind == "ppo" else _num(m, "reward")
        if first is not None and last is not None:
            out.append(f"mean reward {first:.3f} → {last:.3f}")
        kl = _num(m, "kl")
        if kl is not None:  # the unit said: a per-token KL (GRPO/RLOO) is not comparable with a per-response one
            unit, how = KL_UNITS[kind]
            out.append(f"KL {kl:.3g} {unit} ({how})")
        out.append(_steps(m))
    elif kind == "eval":
        baseline = manifest.get("baseline", "")
        for name, row in (manifest.get("policies") or {}).items():
            keys = [k for k in row if k.endswith("/win_rate") and isinstance(row[k], (int, float))]
            reads = [judged(manifest, row, k) for k in keys]
            figures = [f"{row[k]:.1%}{_interval(row.get(k + '_ci'))} by {k[:-len('/win_rate')]}"
                       + (f" ({_ties(r['ties'])})" if r["ties"] is not None else "")
                       for k, r in zip(keys, reads, strict=True)]
            if figures:
                prompts = {r["prompts"] for r in reads}
                out.append(f"{name} vs {baseline}" + (f" {over_prompts(prompts.pop())}" if len(prompts) == 1 else "")
                           + ": " + ", ".join(figures)
                           + (f", KL {row['kl']:.2f} nats per answer" if isinstance(row.get("kl"), (int, float))
                              else ""))
        out += human_lines(manifest)  # a human-only eval's one outcome
    return [part for part in out if part]


def cautions(kind: str, manifest: dict[str, Any], folder: Path | None = None) -> list[str]:
    """What a stage measured that should be looked at before its output is used (plain text); `folder`, the
    stage's, places the parents its manifest names relative to where the stage ran (parent_path)."""
    m = manifest.get("metrics") or {}
    found = []
    answers, cut, which = _num(m, "responses_sampled"), _num(m, "responses_cut"), "the sampled answers"
    if _num(m, "answers_in_batch") and _num(m, "cut_in_batch") is not None:  # what the labels and training read
        answers, cut = _num(m, "answers_in_batch"), _num(m, "cut_in_batch")
        which = f"the answers in batch {manifest.get('batch') or '?'}"
    if kind == "sample" and answers and cut and cut / answers > 0.5:
        found.append(f"{cut / answers:.0%} of {which} were cut at max_new_tokens: raise "
                     "sample.generation.max_new_tokens for answers a person can judge whole, with another run.dir "
                     "(or, for align sample, another batch=): a batch keeps the answers it has")
    otherwise = manifest.get("sampled_otherwise") if kind == "sample" else None
    if isinstance(otherwise, dict) and otherwise.get("tasks"):  # a rerun after the policy was trained again
        found.append(f"{otherwise['tasks']} tasks of batch {manifest.get('batch') or '?'} keep answers sampled "
                     f"otherwise than this run's ({', '.join(otherwise.get('differ') or []) or '?'} differ: an earlier "
                     "policy or settings): the labels, and what trains on them, are of those answers; to sample from "
                     "this policy, use another batch= (or another run.dir)")
    r = _num(m, "length_correlation")
    if kind == "reward" and r is not None and abs(r) > 0.5:
        found.append(f"the reward model's scores track answer length (Pearson r = {r:.2f}: "
                     f"{'longer' if r > 0 else 'shorter'} scores higher), which a policy can exploit")
    if kind == "reward" and (manifest.get("probes") or {}).get("gate"):
        from align.reward_model import MAX_PROBE_FLIP_RATE, probe_failure

        failure = probe_failure(manifest["probes"], MAX_PROBE_FLIP_RATE)
        if failure:
            found.append(f"{failure}: PPO refuses it at that setting")
    for stage, key, what in (("reward", "eval_accuracy", "held-out accuracy"),
                             ("dpo", "heldout_accuracy", "held-out preference accuracy")):
        if kind == stage and (said := near_chance(m, key)):
            found.append(f"its {what} is {said}: more labelled pairs (more held-out prompts for a narrower "
                         "interval) or more training steps")
    if kind == "dpo":
        found += dpo_did_not_move(manifest)
    if kind == "eval" and folder is not None and (weak := judge_caution(manifest, folder)):
        found.append(weak)
    if kind == "eval" and folder is not None:
        found += judged_by_the_labelling_rule(manifest, folder)
        found += policies_on_remade_parents(manifest, folder)
    if kind == "eval":
        cuts = {n: row["cut"] for n, row in (manifest.get("policies") or {}).items()
                if isinstance(row, dict) and isinstance(row.get("cut"), (int, float))}
        gap = round(max(cuts.values()) - min(cuts.values()), 9) if cuts else 0.0  # 0.3 - 0.2 < 0.1 in floats
        if len(cuts) > 1 and round(max(cuts.values()), 9) >= CUT_GAP and gap >= CUT_GAP:
            said = ", ".join(f"{n}'s {c:.0%}" for n, c in cuts.items())
            found.append(f"answers cut at max_new_tokens: {said}; a judge that marks a cut answer down favours the "
                         "policy cut less often: raise eval's generation.max_new_tokens to judge them whole")
    if kind == "export":  # an annotator EM trusts though the gold answers say otherwise (align.labeling.agreement)
        found += ((manifest.get("summary") or {}).get("reliability") or {}).get("warnings") or []
    if kind == "eval":
        for name, seen in (manifest.get("prompts_seen_in_training") or {}).items():
            if seen:
                found.append(f"{name} was trained on {seen} of the {manifest.get('prompts', '?')} eval prompts")
        for name, (where, since) in changed_parents(manifest, folder).items():  # a policy or judge remade since
            found.append(f"eval measured {name} as it was at {manifest['parents'][name]['created']}; {where} {since}"
                         ": its figures are not this one's until align eval runs again")
    else:  # a stage built on an input remade since (a reward model on an earlier export): not of the run as it is
        spec = STAGES.get(kind)
        command = spec.command if spec else None
        if kind == "sample":  # a batch keeps the answers it has: align sample again adds none from the new policy
            remedy = "sample from it into another batch= (or another run.dir)"
        else:  # a folder no stage writes (benchmarks/active_learning.py's) names no align command
            remedy = f"until {command} runs again" if command else "until it is made again"
        for name, (where, since) in changed_parents(manifest, folder).items():
            found.append(f"built on {name} as it was at {manifest['parents'][name]['created']}; {where} {since}: "
                         + (f"its answers are not the {name}'s there now: {remedy}" if kind == "sample" else
                            f"it is not built on the {name} there now {remedy}"))
    return found


def policies_on_remade_parents(m: dict[str, Any], folder: Path) -> list[str]:
    """A caution for each policy eval measured whose own parent (the SFT a DPO started from, ...) was made again
    before eval ran or since: eval compares it with an SFT it did not start from, or judges it with a reward model
    it was not trained against, with no word on the headline (the stage list said so, far below)."""
    found = []
    for name, parent in (m.get("parents") or {}).items():
        if not isinstance(parent, dict) or not parent.get("path") or name == "reward_model":
            continue
        where = parent_path(parent["path"], folder, m)
        own = _manifest(where)
        for up, (there, since) in changed_parents(own or {}, where).items():
            found.append(f"{name} was trained on {up} as it was at {own['parents'][up]['created']}; {there} {since}: "
                         f"eval measured {name} against what it was not built on; train {name} again")
    return found


def changed_parents(manifest: dict[str, Any], folder: Path | None) -> dict[str, tuple[Path, str]]:
    """name -> (folder, what became of it) for each parent of `manifest` (of the stage in `folder`) that is not
    the artifact it was when the stage read it: made again, its manifest spoilt (half a file), unfinished (its
    folder there without a manifest: a rerun stopped or still running), or gone. align pipeline remakes a stage
    by the same rule (already_done)."""
    out = {}
    for name, parent in (manifest.get("parents") or {}).items():
        if not isinstance(parent, dict) or not parent.get("created"):
            continue
        where = parent_path(parent.get("path", ""), folder or Path.cwd(), manifest)
        try:
            now = json.loads((where / MANIFEST).read_text()).get("created")
        except (OSError, ValueError):
            now = None
        if now != parent["created"]:
            out[name] = (where, f"was made again at {now}" if now else
                         f"has an {MANIFEST} that cannot be read" if (where / MANIFEST).is_file() else
                         f"is unfinished (no {MANIFEST}: a rerun stopped, or still running)" if where.is_dir() else
                         "is gone")
    return out


def _clock(seconds: Any) -> str:
    """A stage's wall time as m:ss ('' when its manifest has none: a stage run before align recorded it)."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return ""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}:{rest:02d}"


def at_a_glance(sections: list[tuple[str, Path]]) -> tuple[str, str]:
    """The run on one screen (html, markdown): each finished stage's outcome and wall time, then the cautions."""
    rows, md, warn = [], [], []
    for kind, folder in sections:
        manifest = _manifest(folder)
        if manifest is None:  # kept for its checkpoints (finished_sections(unfinished=True)), or its manifest spoilt
            said = resume_note(kind, folder) if not (folder / MANIFEST).is_file() else \
                f"its {MANIFEST} cannot be read: run the stage again"
            rows.append(f"<tr><td>{_esc(folder.name)}</td><td></td><td>{_esc(said)}</td></tr>")
            md.append(f"- {folder.name}: {said}")
            continue
        kind = kind if kind in STAGES else manifest.get("stage", kind)
        try:
            figures, found = glance(kind, manifest), cautions(kind, manifest, folder)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):  # a manifest of another align version:
            figures, found = [], []  # its section says it
        figures = figures or ["—"]  # or a folder it has no figures for (align merge's)
        name, clock = _esc(folder.name), _clock(manifest.get("seconds"))
        rows.append(f"<tr><td><a href='#{name}'>{name}</a></td><td>{clock}</td>"
                    f"<td>{_esc(' · '.join(figures))}</td></tr>")
        md.append(f"- {folder.name}{f' ({clock})' if clock else ''}: {' · '.join(figures)}")
        warn += [f"{folder.name}: {text}" for text in found]
    if not rows:
        return "", ""
    page = f"<table class='glance'><tr><th>stage</th><th>time</th><th>outcome</th></tr>{''.join(rows)}</table>"
    if warn:
        page += "<div class='cautions'><b>Look at before using the result</b><ul>" + "".join(
            f"<li>{_esc(w)}</li>" for w in warn) + "</ul></div>"
        md += ["", "Look at before using the result:", *[f"- {w}" for w in warn]]
    return page, "\n".join(md) + "\n"


# Extra per-stage sections (e.g. eval's win-rate table): stage -> f(stage_dir, manifest) -> html. A folder
# outside the registry (a benchmark's output in the run directory) is matched by its manifest's stage.
SECTIONS: dict[str, Callable[[Path, dict[str, Any]], str]] = {
    "eval": eval_section, "reward": reward_section, "export": preferences_section,
    "active_learning": active_learning_section}


def wandb_where(manifest: dict[str, Any], run_dir: Path) -> tuple[str, str]:
    """Where a stage's W&B run is (html, markdown): its page online, its folder offline with the command that
    uploads it; ('', '') for a stage that opened none (run.wandb=disabled, a manifest from before align recorded
    it)."""
    run = manifest.get("wandb")
    if not isinstance(run, dict):
        return "", ""
    url = str(run.get("url") or "")
    if url.startswith(("https://", "http://")):
        # an autolink only of a URL that cannot end it early (a ">" in one closed it and the rest was HTML)
        shown = f"<{url}>" if re.fullmatch(r"https?://[^\s<>`\\]+", url) else _md_marks(url)
        return f" · <a href='{_esc(url)}'>W&amp;B run</a>", f"- W&B run: {shown}"
    folder = Path(str(run.get("folder") or ""))
    if not folder.name:
        return "", ""
    from align.tracking import wandb_dir

    own = wandb_dir(run_dir) / "wandb" / folder.name  # a round's are in its root run's wandb/
    if own.is_dir():  # this run's own, also where it was copied or moved since
        folder = own
    try:  # a link that works where the report is opened: relative to the run directory, which holds it
        href = quote(folder.resolve().relative_to(run_dir.resolve()).as_posix())
    except ValueError:  # quoted: a relative folder is a path, never a scheme (a manifest's "javascript:..." ran)
        href = folder.as_uri() if folder.is_absolute() else quote(folder.as_posix())
    sync = f"wandb sync {shell(str(folder))}"
    return (f" · W&amp;B run ({_esc(run.get('mode') or 'offline')}): <a href='{_esc(href)}'>{_esc(folder.name)}</a>, "
            f"uploaded by <code>{_esc(sync)}</code>", f"- W&B run (offline): {_md_code(sync)}")


def metrics_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest's metrics; {} for none or a field of another shape (a hand-edited `"metrics": null`)."""
    m = manifest.get("metrics")
    return m if isinstance(m, dict) else {}


def stage_section(stage: str, folder: Path) -> tuple[str, str] | None:
    """A stage's section (html, markdown), titled and anchored by its folder's name; None before it ran."""
    manifest = _manifest(folder)
    if manifest is None:
        return None
    rows, unreadable = _log_rows(folder / "metrics.jsonl")
    if stage == "reward":
        rows = [_trl_eval_renamed(r) for r in rows]
    plots = [(plot_series(t, rows, keys, ylabel), series_text(t, rows, keys, ylabel)) for t, ylabel, keys in PLOTS.get(stage, [])]
    imgs = "".join(f"<img alt='{_esc(stage)} plot: {_esc(said)}' src='data:image/png;base64,{png}'>"
                   for png, said in plots if png)
    kind = stage if stage in SECTIONS else manifest.get("stage")
    try:
        extra = SECTIONS[kind](folder, manifest) if kind in SECTIONS else ""
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:  # a manifest of another version
        extra = f"<p class='meta'>Its figures could not be drawn from its manifest ({_esc(repr(err))}).</p>"
    title = _esc(folder.name)  # a folder's name is a user's (align export output=...): text, never markup
    plan = f" · {_esc(manifest['device_plan'])}" if manifest.get("device_plan") else ""
    warning = manifest.get("reward_probe_warning")
    metrics = "" if kind == "eval" else _metrics_table(metrics_of(manifest))  # eval's table shows them all
    if metrics and (imgs or extra):  # the figures above say it; every logged number a click away
        metrics = f"<details><summary>all metrics</summary>{metrics}</details>"
    wandb_html, wandb_md = wandb_where(manifest, folder.parent)
    parts = [f"<section id='{title}'><h2>{title}</h2>",
             f"<p class='meta'><a href='{_esc(quote(folder.name))}/'>{_esc(folder.name)}/</a> · "
             f"{_esc(manifest.get('created', ''))}"
             + (f" · base {_esc(manifest['base_model'])}" if manifest.get("base_model") else "")
             + f"{plan}{wandb_html}</p>",
             f"<p class='caution'>{_esc(warning)}</p>" if warning else "",
             f"<p class='meta'>{_esc(unreadable)}</p>" if unreadable else "",
             f"<div class='plots'>{imgs}</div>" if imgs else "", extra, metrics, "</section>"]
    # its folder as a link beside report.md, as the page has it: the path it was built at (/home/me/runs/...)
    # named a folder on another machine once the run was copied or pushed, and GitHub linked nothing
    # with what the page has under its title: when, on which base, how (a run's setup explains its figures)
    setup = " · ".join(_md(v) for v in (manifest.get("created"), manifest.get("base_model") and
                                        f"base {manifest['base_model']}", manifest.get("device_plan")) if v)
    md = [f"## {_md(folder.name)}", "", f"[{_md_marks(folder.name)}/]({quote(folder.name)}/)"
          + (f" · {setup}" if setup else ""), "",
          *([wandb_md, ""] if wandb_md else []),
          *([_md(warning), ""] if warning else []),
          *([_md(unreadable), ""] if unreadable else [])]
    md += [f"- plot: {_md(said)}" for png, said in plots if png]
    if extra:  # its tables (eval's win-rates, answers side by side, probes, annotators) as the page has them
        md += ["", markdown_of(extra)]
    if kind != "eval":  # every logged number, folded as on the page (GitHub opens a <details>); eval's are its table
        listed = [f"- {_md(k)}: {_md_value(v)}" for k, v in metrics_of(manifest).items()
                  if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
        md += ["", "<details><summary>all metrics</summary>", "", *listed, "", "</details>"] if listed and \
            (any(png for png, _ in plots) or extra) else listed
    return "".join(parts), "\n".join(md) + "\n"


def _log_rows(path: Path) -> tuple[list[dict[str, Any]], str]:
    """A stage's metrics.jsonl rows for its plots, and a line naming those that cannot be read ('' if none): a
    line spoilt in the middle (a disk that filled, an edit) failed the whole report (read_jsonl forgives only a
    last line cut short, which is left out here too, unsaid)."""
    if not path.is_file():
        return [], ""
    lines = [(number, line) for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
             if line.strip()]
    rows, bad = [], []
    for i, (number, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif i < len(lines) - 1 or row is not None:
            bad.append(number)
    said = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return rows, f"{path.name}: line{'s' if len(bad) > 1 else ''} {said} cannot be read, left out of the plots" \
        if bad else ""


def _trl_eval_renamed(row: dict[str, Any]) -> dict[str, Any]:
    """A reward stage's log row as it is logged now: before TRL's evaluations were renamed *_batch_mean
    (AlignRewardTrainer.log), their eval_accuracy was a mean of per-batch means beside align's over the pairs
    (its row, the last, has eval_pairs), and both were drawn as one line."""
    if "eval_accuracy" in row and "eval_pairs" not in row:
        return {("eval_accuracy_batch_mean" if k == "eval_accuracy" else k): v for k, v in row.items()}
    return row


CSS = """body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.meta{color:#666;font-size:13px;overflow-wrap:anywhere} .plots img{max-width:49%;margin:.3em .5% 0 0;border:1px solid #eee;box-sizing:border-box}
table{border-collapse:collapse;margin:.6em 0;font-size:14px} td,th{border:1px solid #ddd;padding:.25em .6em;vertical-align:top}
table.kv td:first-child{color:#555} .samples td{max-width:420px;white-space:pre-wrap}
.headline{background:#f3f7fb;border:1px solid #cfe0f0;border-radius:6px;padding:.2em 1em;margin:1em 0}
.cautions,.caution{background:#fff8e6;border:1px solid #f0dca0;border-radius:6px;padding:.4em 1em;margin:1em 0}
.cautions ul{margin:.3em 0} details summary{cursor:pointer;color:#555;margin:.4em 0}
section>table,section>details,table.glance{max-width:100%;overflow-x:auto;display:block}
table.glance td{overflow-wrap:anywhere} table.glance td:not(:last-child){white-space:nowrap;overflow-wrap:normal}
.headline li{overflow-wrap:anywhere} .plots img:only-child{max-width:100%}
@media (max-width:700px){.plots img{max-width:100%;margin:.3em 0 0}}
@media print{body{max-width:none;margin:0;padding:0} table{font-size:11px} td,th{padding:.15em .35em}
section>table,section>details,table.glance{display:table;overflow:visible} .plots img,tr{break-inside:avoid}
h2,h3{break-after:avoid}}"""


def finished_sections(run_dir: Path, unfinished: bool = False) -> list[tuple[str, str]]:
    """(stage, folder) of every finished artifact in a run: the registry's stages in its order, then any
    other folder with a manifest (e.g. align merge's sft-merged/); with `unfinished`, also each folder kept
    without one for its checkpoints (a run stopped in training, to resume)."""
    folders = {s.folder: s.name for s in STAGES.values() if s.folder}
    # A stage's own folder without a manifest is listed too: a rerun that failed or stopped (its align.json goes
    # first) left no line at all for sample, export or eval, which keep no checkpoints: a run that never made them.
    found = sorted(p.name for p in run_dir.iterdir() if p.is_dir() and (
        (p / MANIFEST).is_file() or unfinished and (checkpoint_steps(p) or p.name in folders))) \
        if run_dir.is_dir() else []
    return [(name, folder) for folder, name in folders.items() if folder in found] + \
        [(folder, folder) for folder in found if folder not in folders]


def resume_note(stage: str, folder: Path) -> str:
    """What a folder kept without its manifest for its checkpoints is (a run stopped in training), and the key
    that resumes it: as `align <stage>` takes it, and as `align pipeline` does (resume_key). A folder another
    process holds locked (its stage training now: reward and dpo run side by side) is running, not to resume."""
    steps = checkpoint_steps(folder)
    if _held_elsewhere(folder):
        return f"running (another process holds it; no {MANIFEST} yet" + \
            (f", checkpoints to step {steps[-1]})" if steps else ")")
    spec = STAGES.get(stage)
    command = spec.command if spec else f"align {stage}"
    if not steps:  # a stage keeping no checkpoints (sample, export, eval), or one that failed before the first
        return f"unfinished or failed (no {MANIFEST}: its last run stopped or failed): run {command} again"
    said = (f"unfinished (no {MANIFEST}; checkpoints to step {steps[-1]}): resume with "
            f"{command} ... {resume_key(folder, None)}")
    return said + (f" (align pipeline ... {resume_key(folder, 'pipeline')})" if spec else "")


def glance_text(run_dir: str | Path) -> str:
    """The report's first screen as text for a terminal: each stage's outcome, then the cautions."""
    run_dir = Path(run_dir)
    return at_a_glance([(stage, run_dir / folder) for stage, folder in finished_sections(run_dir, unfinished=True)])[1]


def stale_round(run_dir: Path) -> str | None:
    """Why a later round's folder (round-<r>/) is not of its run as it now is: one of its stages was built on an
    artifact outside it (an earlier round's policy, round 0's sft) made again, unfinished or gone since (a
    pipeline rerun with fewer rounds remakes round 0 and leaves round-1/ as it was); None when each is the one
    it read, or run_dir is no later round."""
    if round_root(run_dir) is None:
        return None
    inside = run_dir.resolve()
    for _, name in finished_sections(run_dir):
        folder = run_dir / name
        manifest = _manifest(folder)
        for parent, (where, since) in changed_parents(manifest or {}, folder).items():
            if inside in where.resolve().parents:  # its own round's: that round's report says so
                continue
            owner = where.parent.name if round_root(where.parent) else "round-0"
            return (f"{run_dir.name} is stale: its {name} was built on the {owner} {where.name} of "
                    f"{manifest['parents'][parent]['created']}, which {since}")
    return None


def stale_rounds(rounds: list[Path]) -> dict[Path, str]:
    """round -> why it is stale (stale_round), for each of `rounds` (in order) that is, or follows one that is."""
    found: dict[Path, str] = {}
    for r, later in enumerate(rounds):
        why = stale_round(later) or (f"{later.name} follows {rounds[r - 1].name}, which is stale" if found else None)
        if why:
            found[later] = why
    return found


NO_VERDICT = ("No verdict yet: this run has no eval; align eval judges each policy against the baseline, "
              "with a 95% interval")


def write_report(run_dir: str | Path) -> Path:
    from align.artifacts import is_main_process

    run_dir = Path(run_dir)
    if not is_main_process():
        return run_dir / "report.html"
    sections = finished_sections(run_dir, unfinished=True)
    glance_html, glance_md = at_a_glance([(stage, run_dir / folder) for stage, folder in sections])
    name = Path.cwd().joinpath(run_dir).resolve().name  # `python -m align.report .` names the folder, not ""
    bodies, mds, shown = [], [f"# align run: {_md(name)}\n", _headline_md(run_dir), _md(glance_md)], []
    for stage, folder in sections:
        section = stage_section(stage, run_dir / folder)
        if section:
            bodies.append(section[0])
            mds.append(section[1])
            shown.append(folder)
    rounds = [p for p in later_rounds(run_dir) if (p / "report.html").is_file()]
    stale = stale_rounds(rounds)
    current = [r for r in rounds if r not in stale]
    top = headline(run_dir)
    last_top = headline(current[-1]) if current else ""  # the last round's verdict, read once
    if last_top:  # the answer is the last round's: first, and each labelled with its round
        try:
            apart = judges_apart(run_dir, current[-1]) if top else None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):  # a manifest of another shape
            apart = None
        mds[1] = (f"{_md(current[-1].name)}, the last round:\n\n{_headline_md(current[-1])}"
                  + (f"\nround 0 (this folder):\n\n{mds[1]}" if top else "")  # (before `top` is the page's)
                  + (f"\n{_md(apart)}\n" if apart else ""))
        top = (f"<p class='meta'>{_esc(current[-1].name)}, the last round:</p>{last_top}"
               + (f"<p class='meta'>round 0 (this folder):</p>{top}" if top else "")
               + (f"<div class='cautions'>{_esc(apart)}</div>" if apart else ""))
    if rounds:
        # the last round's verdict is the page's first: not said again here
        lead = current[-1] if last_top else None
        items = "".join(f"<li><a href='{_esc(r.name)}/report.html'>{_esc(r.name)}</a>"
                        + (f"<p class='caution'>{_esc(stale[r])}</p>" if r in stale else
                           "<p class='meta'>its verdict is the first on this page</p>" if r == lead else headline(r))
                        + "</li>" for r in rounds)
        bodies.append(f"<section id='rounds'><h2>later rounds</h2><ul>{items}</ul></section>")
        mds += ["## later rounds\n"] + [f"- [{_md(r.name)}]({r.name}/report.md)" + (f": {_md(stale[r])}" if r in stale else "")
                                         for r in rounds]
    # The answer under a heading of its own, first (a screen reader's list of headings skipped it), and a run
    # without one says so rather than opening on its stages' table as if that were the outcome
    none = "" if top else f"<p>{_esc(NO_VERDICT)}</p>"
    top = f"<h2 id='verdict'>Verdict: did the policy beat its baseline?</h2>{top}{none}"
    mds[1] = "## Verdict: did the policy beat its baseline?\n\n" + (f"{NO_VERDICT}\n" if none else mds[1])
    if glance_html:  # round 0's, where later rounds lead the verdict above (each round's report has its own)
        which = " (round 0, this folder)" if rounds else ""
        glance_html = f"<h2 id='glance'>Stages at a glance{which}</h2>{glance_html}"
        mds[2] = f"## Stages at a glance{which}\n\n{mds[2]}"
    if own := stale_round(run_dir):  # this report is a later round's, built on what is there no more: above all
        top = f"<div class='cautions'>{_esc(own)}</div>{top}"
        mds[1] = f"{_md(own)}\n\n{mds[1]}"
    nav = " · ".join(f"<a href='#{_esc(s)}'>{_esc(s)}</a>" for s in shown)
    page = (f"<!doctype html><html><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'><title>align · {_esc(name)}</title>"
            f"<style>{CSS}</style></head><body><h1>align run: {_esc(name)}</h1>"
            f"<p class='meta'>stages: {nav}</p>{top}{glance_html}{''.join(bodies)}</body></html>")
    out = run_dir / "report.html"
    for path, text in ((out, page), (run_dir / "report.md", "\n".join(mds))):
        # written beside and swapped in: two stages that finish at once (reward beside dpo) each write the whole
        # report, and a reader (or the other writer) never meets half of one, nor two interleaved
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return out


def eval_judges(m: dict[str, Any]) -> set[str]:
    """The judges an eval manifest has win-rates by (reward_model, scorer:<name>, ...), over its policies' rows."""
    return {k[:-len("/win_rate")] for row in (m.get("policies") or {}).values() if isinstance(row, dict)
            for k in row if isinstance(k, str) and k.endswith("/win_rate")}


def _trained_on(folder: Path, manifest: dict[str, Any], seen: set[Path], depth: int = 4) -> tuple[set[str], set[str]]:
    """(the annotators of every preference set behind the stage in `folder`, the scorers it or a stage behind it
    trained on as their reward), through its parents (`depth` levels: a PPO policy's labels are its reward
    model's)."""
    annotators: set[str] = set()
    scorers: set[str] = set()
    summary = manifest.get("summary") if isinstance(manifest.get("summary"), dict) else {}
    named = summary.get("annotators") or summary.get("per_annotator")  # an older export's name for them
    annotators |= {a for a in named if isinstance(a, str)} if isinstance(named, dict) else set()
    scorer = (manifest.get("config") or {}).get("scorer")
    if manifest.get("stage") in stages_of_kind("policy") and isinstance(scorer, str) and scorer:
        scorers.add(scorer)
    for parent in (manifest.get("parents") or {}).values():
        if depth <= 0 or not isinstance(parent, dict) or not isinstance(parent.get("path"), str):
            continue
        where = parent_path(parent["path"], folder, manifest)
        if where in seen or (above := _manifest(where)) is None:
            continue
        seen.add(where)
        more = _trained_on(where, above, seen, depth - 1)
        annotators |= more[0]
        scorers |= more[1]
    return annotators, scorers


def judged_by_the_labelling_rule(m: dict[str, Any], folder: Path) -> list[str]:
    """A caution for each scorer judge of the eval in `folder` that its policies were trained towards: the reward
    a policy behind it trained on (PPO or GRPO's `scorer`), or the rule its labels were ranked by, every
    annotator of every preference set behind the policies (or the judging reward model), through their parents,
    a simulated one of that scorer (`sim-<scorer>-<i>`, align.labeling.simulate). Its win-rate then says how well
    a policy learnt that rule, not how good its answers are beyond it (the quickstart's verdict is of this kind)."""
    from align.labeling.simulate import account_stem

    # the eval's own manifest (its cwd, run.dir: parents placed where a copied run has them); eval trains on nothing
    annotators, rewards = _trained_on(folder, m, set())
    out = []
    for judge in sorted(j for j in eval_judges(m) if j.startswith("scorer:")):
        name = judge.removeprefix("scorer:")
        if name in rewards:
            out.append(f"{judge} is the reward a policy here was trained on: its win-rate says how well the policy "
                       "learnt to raise it (reward hacking included), not how good its answers are beyond it; a "
                       "judge it was not trained on (people: eval human=true) says that")
            continue
        # the whole name: sim-<stem>-<i>, or with a profile that ranks by the scorer (good, noisy:A); `support`'s
        # stem starts `support_style`'s, and random or adversarial annotators do not rank by it
        named = re.compile(rf"sim-{re.escape(account_stem(name))}-\d+(-(good|noisy-[\d-]+))?")
        if annotators and all(named.fullmatch(a) for a in annotators):
            out.append(f"{judge} is the rule the training labels were ranked by (simulated annotators "
                       f"{', '.join(sorted(annotators))}): its win-rate says how well a policy learnt that rule, "
                       "not how good its answers are beyond it; a judge the labels did not come from (people: "
                       "eval human=true) says that")
    return out


def judges_apart(run_dir: Path, last: Path) -> str | None:
    """A caution when round 0's eval (in `run_dir`) and the `last` round's were judged by different reward models:
    their reward_model win-rates are not comparable (a round's 50% -> 86.5% by two models that scored the same
    SFT answers 0.78 and 2.03), and the judges both rounds share are the ones to compare them by."""
    evals = [(d, _manifest(d)) for d in (stage_dir(run_dir, "eval"), stage_dir(last, "eval"))]
    if any(m is None for _, m in evals):
        return None
    judges = [judging_reward_model(m, d) for d, m in evals]
    if None in judges or judges[0].resolve() == judges[1].resolve():
        return None

    shared = sorted((eval_judges(evals[0][1]) & eval_judges(evals[1][1])) - {"reward_model"})
    return (f"The rounds' reward_model verdicts come from different reward models ({judges[0].parent.name}/"
            f"{judges[0].name} and {judges[1].parent.name}/{judges[1].name}): they are not comparable with each other"
            + (f"; compare the rounds by {', '.join(shared)}, the judge{'s' if len(shared) > 1 else ''} both share"
               if shared else "") + ".")


def main(argv: list[str] | None = None) -> int:
    """`python -m align.report [RUN_DIR]`: rebuild the report, printing report.html's path. A folder that is
    not there, or holds no stage folder, is one line and exit status 2 (it wrote `<typo>/report.html` or
    failed with a traceback; `--help` was read as a folder)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m align.report", description=(
        "Rebuild a run's report.html and report.md from the align.json and metrics.jsonl its stages wrote."))
    parser.add_argument("run_dir", nargs="?", default="runs/quickstart",
                        help="the run directory (run.dir), holding sft/, dpo/, ... (default: runs/quickstart)")
    run_dir = Path(parser.parse_args(argv).run_dir)
    if not run_dir.is_dir() or not (finished_sections(run_dir, unfinished=True)
                                    or any((run_dir / spec.folder).is_dir() for spec in STAGES.values() if spec.folder)):
        said = "no run directory" if not run_dir.is_dir() else "no stage folder in"
        print(f"{said} {run_dir} (a run directory holds sft/, dpo/, ...)", file=sys.stderr)
        return 2
    print(write_report(run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
