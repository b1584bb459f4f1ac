"""The labelling app: Gradio layout only, every decision is a call into `labeling.handlers`.

    align label users add alice --admin
    align label serve --store sqlite:///runs/labels.db

The signed-in session lives in a `gr.State` (server side, one per browser tab), so a client can
neither write anonymously nor claim to be an admin. Keyboard shortcuts are a small script
installed on page load (see SHORTCUTS); it only clicks the same radios and buttons a mouse would.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import gradio as gr

from labeling import handlers

log = logging.getLogger(__name__)

MAX_K = 8  # response slots laid out; tasks with more responses are refused with a message
LETTERS = "ABCDEFGH"
# A/B verdicts: (label, the key handlers.pairwise_ranks turns into ranks of two and flags).
PAIRWISE = [("A better", "A"), ("Tie", "tie"), ("B better", "B"), ("Both bad", "both_bad")]
GUIDELINES = Path(__file__).with_name("guidelines.md")

SHORTCUTS = """**Keyboard** (outside text boxes): **a**-**d** select a response, **1**-**4** give the selected \
response that rank and move to the next one (so `2 1 4 3` ranks A..D), **x** all are bad, **u** unsafe, \
**s** skip, **Enter** or **Ctrl+Enter** submit (Ctrl+Enter also works in the rationale box). \
A/B tasks: **1** A better, **2** tie, **3** B better, **4** both bad."""

CSS = """
.align-response { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px 12px; }
/* text at the top, the rank radios at the bottom, whatever the neighbour's height */
.align-response > .block, .align-response > .form { flex-grow: 0 !important; margin: 0 !important; }
.align-response > .align-body { flex-grow: 1 !important; }
.align-response.align-selected { border-color: var(--color-accent); box-shadow: 0 0 0 2px var(--color-accent-soft); }
.align-letter h3 { margin: 0; }
#align-prompt { font-size: 1.05em; border-left: 4px solid var(--color-accent); padding-left: 12px; }
#align-message.align-error, #align-signin-error { color: var(--error-text-color, #b91c1c); }
"""

# Installed once per page by demo.load(js=...). Selectors are the elem_ids set below.
KEYS_JS = """
() => {
  if (window.__alignKeys) return;
  window.__alignKeys = true;
  const style = document.createElement('style');
  style.textContent = %s;
  document.head.appendChild(style);
  const shown = (el) => !!el && el.offsetParent !== null;
  const byId = (id) => document.getElementById(id);
  const slots = () => [...'abcdefgh'].map((l) => byId('resp-' + l)).filter(shown);
  let sel = 0;
  const mark = () => slots().forEach((el, i) => el.classList.toggle('align-selected', i === sel));
  const clickRadio = (id, value) => {
    const input = document.querySelector('#' + id + ' input[type=radio][value="' + value + '"]');
    if (input) input.click();
    return !!input;
  };
  document.addEventListener('click', (e) => {
    const slot = e.target.closest && e.target.closest('.align-response');
    if (slot) { sel = Math.max(0, slots().indexOf(slot)); mark(); }
    if (e.target.closest && e.target.closest('#align-submit, #align-skip, #align-signin')) { sel = 0; setTimeout(mark, 300); }
  }, true);
  document.addEventListener('keydown', (e) => {
    const submit = byId('align-submit');
    if (!shown(submit)) return;
    const t = e.target;
    const typing = t && (t.tagName === 'TEXTAREA' || t.isContentEditable ||
      (t.tagName === 'INPUT' && !['radio', 'checkbox'].includes(t.type)));
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); submit.click(); sel = 0; return; }
    if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
    const key = e.key.toLowerCase();
    if (key === 'enter') { if (t.tagName === 'BUTTON') return; e.preventDefault(); submit.click(); sel = 0; return; }
    if (key === 's') { e.preventDefault(); byId('align-skip').click(); sel = 0; return; }
    if (key === 'u' || key === 'x') {
      const box = document.querySelector((key === 'u' ? '#align-unsafe' : '#align-all-bad') + ' input[type=checkbox]');
      if (shown(box)) { e.preventDefault(); box.click(); }
      return;
    }
    if (shown(byId('align-pairwise'))) {
      const options = document.querySelectorAll('#align-pairwise input[type=radio]');
      const n = parseInt(key, 10);
      if (n >= 1 && n <= options.length) { e.preventDefault(); options[n - 1].click(); }
      return;
    }
    const list = slots();
    const letter = 'abcdefgh'.indexOf(key);
    if (key.length === 1 && letter >= 0 && letter < list.length) { e.preventDefault(); sel = letter; mark(); return; }
    const rank = parseInt(key, 10);
    if (rank >= 1 && rank <= list.length) {
      e.preventDefault();
      if (sel >= list.length) sel = 0;
      if (clickRadio('rank-' + 'abcdefgh'[sel], String(rank))) sel = Math.min(sel + 1, list.length - 1);
      mark();
    }
  });
}
"""


def _js() -> str:
    return KEYS_JS % json.dumps(CSS)


def _table(rows: list[dict] | None) -> Any:
    import pandas as pd

    frame = pd.DataFrame(rows or [])
    return frame.fillna("") if not frame.empty else frame


def _num(value: Any, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _totals(stats: dict) -> str:
    totals, people = stats.get("totals", {}), stats.get("per_annotator") or []
    per_hour = sum(p.get("per_hour") or 0 for p in people if p.get("done"))
    seconds = [p["mean_seconds"] for p in people if p.get("mean_seconds") is not None]
    return (f"**{totals.get('tasks', 0)}** tasks · **{totals.get('rankings', 0)}** rankings · "
            f"**{totals.get('annotators', 0)}** active annotators · throughput **{per_hour:.1f}** rankings/hour"
            + (f" · **{sum(seconds) / len(seconds):.0f} s** per task on average" if seconds else ""))


def _agreement(agreement: dict) -> str:
    if not agreement.get("n_tasks"):
        return "**Agreement:** no task has two rankings yet (raise `--overlap` to measure it)."
    return (f"**Agreement** over {agreement['n_tasks']} tasks ranked by two or more annotators: "
            f"Krippendorff α (ordinal) **{_num(agreement.get('krippendorff_alpha'))}** · "
            f"pairwise agreement **{_num(agreement.get('pairwise_agreement'))}** · "
            f"Kendall τ-b **{_num(agreement.get('kendall_tau'))}**")


def _export_summary(folder: str, summary: dict) -> str:
    dropped = ", ".join(f"{k.removeprefix('dropped_').replace('_', ' ')} {v}" for k, v in summary.items()
                        if k.startswith("dropped_") and v) or "none"
    counted = (f"from {summary.get('rankings', 0)} rankings of {summary.get('tasks', 0)} tasks · "
               f"mean agreement {_num(summary.get('mean_agreement'))} · dropped: {dropped}")
    if not summary.get("pairs"):
        return f"**No pairs**, nothing written ({counted}): rankings that are all ties or flagged give none."
    return (f"**Exported** {summary['pairs']} pairs (train {summary.get('train_pairs', '?')}, test "
            f"{summary.get('test_pairs', '?')}) to `{folder}` {counted}")


def build_app(store, guidelines_md: str | None = None, *, overlap: int = 1, gold_rate: float = 0.0,
              export_dir: str | Path | None = None, batch: str | None = None) -> gr.Blocks:
    """The annotator and admin screens on `store`; `guidelines_md` defaults to labeling/guidelines.md.

    `overlap`, `gold_rate` and `batch` go to handlers.next_task; `export_dir` is the Export button's
    default folder.
    """
    guidelines_md = guidelines_md if guidelines_md is not None else GUIDELINES.read_text()

    with gr.Blocks(title="align · labelling") as demo:
        session = gr.State(None)  # handlers.sign_in's dict; server side, per tab
        task = gr.State(None)  # the task on screen (handlers.next_task's dict)
        shown_at = gr.State(0.0)  # time.monotonic() when that task was shown

        with gr.Row():
            gr.Markdown("## align · labelling")
            who = gr.Markdown("", elem_id="align-who")
            sign_out = gr.Button("Sign out", size="sm", visible=False, scale=0, min_width=100,
                                 elem_id="align-signout")

        with gr.Column(visible=True, elem_id="align-signin-panel") as signin_panel:
            name = gr.Textbox(label="Name", elem_id="align-name")
            password = gr.Textbox(label="Password", type="password", elem_id="align-password")
            signin = gr.Button("Sign in", variant="primary", elem_id="align-signin")
            signin_error = gr.Markdown("", elem_id="align-signin-error")

        with gr.Tabs(visible=False, elem_id="align-tabs") as tabs:
            with gr.Tab("Label", id="label", elem_id="align-label-tab"):
                with gr.Accordion("Guidelines", open=False, elem_id="align-guidelines"):
                    gr.Markdown(guidelines_md)
                progress = gr.Markdown("", elem_id="align-progress")
                prompt = gr.Markdown("", elem_id="align-prompt")
                slots, bodies, ranks = [], [], []
                for row_start in range(0, MAX_K, 2):
                    with gr.Row(equal_height=True):
                        for i in range(row_start, row_start + 2):
                            letter = LETTERS[i]
                            with gr.Column(visible=False, elem_id=f"resp-{letter.lower()}",
                                           elem_classes=["align-response"]) as slot:
                                gr.Markdown(f"### {letter}", elem_classes=["align-letter"])
                                bodies.append(gr.Markdown("", elem_classes=["align-body"]))
                                ranks.append(gr.Radio([], label=f"Rank of {letter} (1 = best)",
                                                      elem_id=f"rank-{letter.lower()}"))
                            slots.append(slot)
                pairwise = gr.Radio(PAIRWISE, label="Which response is better?", visible=False,
                                    elem_id="align-pairwise")
                with gr.Row():
                    all_bad = gr.Checkbox(label="All are bad", elem_id="align-all-bad")
                    unsafe = gr.Checkbox(label="Unsafe (harmful, leaks data, dangerous advice)",
                                         elem_id="align-unsafe")
                rationale = gr.Textbox(label="Rationale (optional)", lines=2, elem_id="align-rationale")
                with gr.Row():
                    submit = gr.Button("Submit", variant="primary", elem_id="align-submit")
                    skip = gr.Button("Skip", elem_id="align-skip")
                message = gr.Markdown("", elem_id="align-message")
                gr.Markdown(SHORTCUTS, elem_id="align-shortcuts")

            with gr.Tab("Admin", id="admin", visible=False, elem_id="align-admin-tab") as admin_tab:
                with gr.Row(equal_height=True):
                    totals = gr.Markdown("", elem_id="align-totals")
                    refresh = gr.Button("Refresh", size="sm", scale=0, min_width=100, elem_id="align-refresh")
                admin_message = gr.Markdown("", elem_id="align-admin-message")
                per_annotator = gr.Dataframe(label="Per annotator", interactive=False,
                                             elem_id="align-per-annotator")
                per_batch = gr.Dataframe(label="Per batch", interactive=False, elem_id="align-per-batch")
                agreement = gr.Markdown("", elem_id="align-agreement")
                with gr.Row():
                    out_dir = gr.Textbox(value=str(export_dir or "runs/quickstart/preferences"), label="Export folder",
                                         elem_id="align-export-dir", scale=3)
                    export = gr.Button("Export preference dataset", variant="primary",
                                       elem_id="align-export", scale=1)
                export_summary = gr.Markdown("", elem_id="align-export-summary")

        # ---- events: thin adapters from widgets to handlers -------------------------------------
        task_outputs = [task, shown_at, progress, prompt, *slots, *bodies, *ranks, pairwise, all_bad,
                        unsafe, rationale, submit]

        def show(next_: dict | None) -> list:
            """Updates for `task_outputs` that put `next_` (or the all-done screen) on the page."""
            blank = [gr.update(visible=False)] * MAX_K
            if next_ is None:
                return [None, 0.0, "**All done.** Nothing is left for you to label; thank you!",
                        "", *blank, *[gr.update(value="")] * MAX_K, *[gr.update(value=None)] * MAX_K,
                        gr.update(visible=False, value=None), False, False, "", gr.update(interactive=False)]
            responses, k = next_["responses"], len(next_["responses"])
            is_pair = next_.get("kind") == "pairwise"
            done, assigned = next_["progress"]["done"], next_["progress"]["assigned"]
            choices = [str(r) for r in range(1, k + 1)]
            # a partial ranking saved earlier (handlers.next_task's "draft"), so a reload loses nothing
            draft = (next_.get("draft") or []) + [None] * MAX_K
            return [
                next_, time.monotonic(),
                f"**Progress:** {done} / {assigned} done"
                + (f" ({next_['progress']['skipped']} skipped)" if next_["progress"].get("skipped") else "")
                + f" · task {next_['task_id']} · "
                + ("A/B comparison" if is_pair else f"rank {k} responses, ties allowed"),
                f"**Customer:** {next_['prompt']}",
                *[gr.update(visible=i < k) for i in range(MAX_K)],
                *[gr.update(value=responses[i] if i < k else "") for i in range(MAX_K)],
                *[gr.update(choices=choices, value=str(draft[i]) if draft[i] else None, visible=not is_pair)
                  for i in range(MAX_K)],
                gr.update(visible=is_pair, value=None),
                gr.update(value=False, visible=not is_pair), False, "", gr.update(interactive=True),
            ]

        def next_for(sess: dict) -> dict | None:
            found = handlers.next_task(store, sess, overlap=overlap, gold_rate=gold_rate, batch=batch)
            if found is not None and len(found["responses"]) > MAX_K:
                raise gr.Error(f"task {found['task_id']} has {len(found['responses'])} responses; "
                               f"the app lays out at most {MAX_K}")
            return found

        def do_sign_in(user: str, secret: str):
            try:
                sess = handlers.sign_in(store, user.strip(), secret)
            except handlers.AuthError as err:
                log.info("sign-in refused for %r: %s", user, err)
                return [None, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), f"⚠️ {err}",
                        "", *[gr.skip()] * len(task_outputs)]
            role = " (admin)" if sess.get("is_admin") else ""
            return [sess, gr.update(visible=False), gr.update(visible=True),
                    gr.update(visible=bool(sess.get("is_admin"))), gr.update(visible=True),
                    f"Signed in as **{sess['name']}**{role}", "", "", *show(next_for(sess))]

        signin_outputs = [session, signin_panel, tabs, admin_tab, sign_out, who, signin_error, password,
                          *task_outputs]
        signin.click(do_sign_in, [name, password], signin_outputs)
        password.submit(do_sign_in, [name, password], signin_outputs)

        def do_sign_out():
            return [None, gr.update(visible=True), gr.update(visible=False), gr.update(visible=False),
                    gr.update(visible=False), "", "", "", *show(None)]

        sign_out.click(do_sign_out, None, signin_outputs)

        def do_submit(sess, current, started, *values):
            rank_values, (verdict, bad, is_unsafe, why) = values[:MAX_K], values[MAX_K:]
            if sess is None or current is None:
                return ["⚠️ Sign in and open a task first.", *[gr.skip()] * (len(task_outputs) - 1),
                        gr.update(interactive=current is not None)]
            k = current["k"]
            try:
                if current.get("kind") == "pairwise":
                    shown, flags = handlers.pairwise_ranks(verdict)
                    bad = bad or "all_bad" in flags
                else:
                    shown = list(rank_values[:k])
                result = handlers.submit(store, sess, current, shown, all_bad=bool(bad), unsafe=bool(is_unsafe),
                                         rationale=why or "", seconds=round(time.monotonic() - started, 2))
            except (ValueError, PermissionError, handlers.AuthError) as err:
                return [f"⚠️ {err}", *[gr.skip()] * (len(task_outputs) - 1), gr.update(interactive=True)]
            return [f"✅ {result.get('message') or 'Saved.'}", *show(next_for(sess))]

        def do_draft(sess, current, *rank_values):
            """Every rank the annotator sets is kept as a draft (never over a submitted ranking)."""
            if sess is None or current is None or current.get("kind") == "pairwise":
                return
            try:
                handlers.save_draft(store, sess, current, list(rank_values[:current["k"]]))
            except (ValueError, PermissionError, handlers.AuthError) as err:
                log.warning("draft of task %s not saved: %s", current.get("task_id"), err)

        for rank in ranks:  # .input: the annotator's own clicks and keys, not the updates show() makes
            rank.input(do_draft, [session, task, *ranks], None, trigger_mode="always_last",
                       show_progress="hidden")

        def do_skip(sess, current):
            if sess is None:
                return ["⚠️ Sign in first.", *[gr.skip()] * len(task_outputs)]
            if current is not None:
                handlers.skip(store, sess, current)
            return [f"Skipped task {current['task_id']}." if current else "", *show(next_for(sess))]

        # trigger_mode="once" ignores clicks while a submit is pending; disabling the button first
        # makes that visible. handlers.submit is idempotent, so a replayed request keeps one ranking.
        # The last step runs even when do_submit failed unexpectedly: never leave Submit disabled.
        submit.click(lambda: gr.update(interactive=False), None, submit, queue=False).then(
            do_submit, [session, task, shown_at, *ranks, pairwise, all_bad, unsafe, rationale],
            [message, *task_outputs]).then(
            lambda current: gr.update(interactive=current is not None), task, submit, queue=False)
        skip.click(do_skip, [session, task], [message, *task_outputs])

        def do_refresh(sess):
            try:
                stats = handlers.admin_stats(store, sess, overlap=overlap)
            except (PermissionError, handlers.AuthError) as err:
                return [f"⛔ {err}", "", None, None, ""]
            return ["", _totals(stats), _table(stats.get("per_annotator")), _table(stats.get("per_batch")),
                    _agreement(stats.get("agreement") or {})]

        def do_export(sess, folder):
            try:
                summary = handlers.export(store, sess, folder)
            except (PermissionError, handlers.AuthError) as err:
                return f"⛔ {err}"
            except ValueError as err:
                return f"⚠️ {err}"
            return _export_summary(folder, summary)

        admin_outputs = [admin_message, totals, per_annotator, per_batch, agreement]
        refresh.click(do_refresh, session, admin_outputs)
        admin_tab.select(do_refresh, session, admin_outputs)
        export.click(do_export, [session, out_dir], export_summary)

        demo.load(None, None, None, js=_js())
    return demo
