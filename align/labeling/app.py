"""The labelling app: Gradio layout only, every decision is a call into `align.labeling.handlers`.

    align label users add alice --admin
    align label --run-dir runs/quickstart

align/labeling/server.py serves this page only to a signed-in browser. Every event takes the
identity from the request's signed session cookie, checked against the store on that call
(`auth.session_of`), never from state a client could replay; the task an event acts on is the
one the page names (a hidden field: an opaque handle, `handlers.task_handle`, never the task's id,
which would tell gold tasks apart), found among the annotator's assignments, the page's
account (another hidden field) must be the cookie's (`handlers.check_page_account`), and a submit
or draft carries the fingerprint of the order the page shows (a third): ranks given in an order the
server no longer shows are refused, never saved (`handlers.check_order`). Prompts and
responses are shown as escaped text (`handlers.text_html`): nothing in model output is ever
HTML on this page, the Playground tab's chat panes included (align/labeling/playground.py: two models of
an `align serve` endpoint side by side, `align label --serve-url URL`; admins only while blind A/B
tasks are open: `handlers.playground_open`). Keyboard shortcuts are a small script installed on page load (see
SHORTCUTS); it only clicks the same radios and buttons a mouse would. The same script shows a notice
when the server refuses a call of the page because its session has ended, or because the store could not
check it (see PAGE_JS).
"""

from __future__ import annotations

import collections
import html
import json
import logging
import secrets
import string
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
from sqlalchemy.exc import SQLAlchemyError

from align.labeling import auth, handlers
from align.labeling.playground import PlaygroundError, ServeClient, conversation_html
from align.labeling.playground import send as playground_send
from align.labeling.store import MAX_RESPONSES, StoreError

log = logging.getLogger(__name__)

MAX_K = MAX_RESPONSES  # response slots laid out (add_tasks refuses a task with more)
LETTERS = handlers.LETTERS  # the letters the page shows each response by, which handlers names in its messages
RANK_CHOICES = [str(r) for r in range(1, MAX_K + 1)]
# A/B verdicts: (label, the key handlers.pairwise_ranks turns into ranks of two and flags).
PAIRWISE = [("A better", "A"), ("Tie", "tie"), ("B better", "B"), ("Both bad", "both_bad")]
GUIDELINES = Path(__file__).with_name("guidelines.md")

SHORTCUTS = """**Keyboard** (outside text boxes): **a**-**d** select a response, **1**-**4** give the selected \
response that rank and move to the next one (so `2 1 4 3` ranks A..D), **x** all are bad, **u** the selected \
response is unsafe (again: it is not), **Alt+S** skip, **Enter** or **Ctrl+Enter** submit (Ctrl+Enter also works in the rationale box). \
A/B tasks: **1** A better, **2** tie, **3** B better, **4** both bad. The single keys (letters, digits, Enter) can be \
turned off below, for speech input or a screen reader's own keys; Ctrl+Enter and Alt+S stay."""

CSS = """
.align-response { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px 12px; }
/* text at the top, the rank radios at the bottom, whatever the neighbour's height */
.align-response > .block, .align-response > .form { flex-grow: 0 !important; margin: 0 !important; }
.align-response > .align-body { flex-grow: 1 !important; }
.align-response.align-selected { border-color: var(--color-accent); box-shadow: 0 0 0 2px var(--color-accent-soft); }
.align-letter h3 { margin: 0; }
/* the keyboard's focus: Gradio's radios and checkboxes only turned their 1 px border orange, hard to find on a page
   of sixteen rank radios (and under 3:1 against white); a 2 px blue ring (5:1) */
.align-response input:focus-visible, #align-pairwise input:focus-visible,
#align-all-bad input:focus-visible { outline: 2px solid #2563eb !important; outline-offset: 2px; }
/* Gradio's primary buttons (Submit, Send) wrote white on orange-500: 2.8:1, under WCAG AA's 4.5:1 for text; on
   orange-700 5.2:1, orange-800 on hover 7.3:1 */
button.primary:not(:disabled) { background: #c2410c !important; border-color: #c2410c !important; color: #ffffff !important; }
button.primary:not(:disabled):hover { background: #9a3412 !important; border-color: #9a3412 !important; }
/* the selected tab's name, orange-500 on white (2.8:1) too */
#align-tabs button[role="tab"][aria-selected="true"] { color: #c2410c !important; }
#align-prompt { font-size: 1.05em; border-left: 4px solid var(--color-accent); padding-left: 12px; }
#align-prompt .align-label { font-weight: 600; margin: 0 0 4px; }
/* model text is plain text: keep its line breaks and wrap long words, never interpret it; a glyph wider or
   taller than the box (one letter with many combining marks) scrolls or is clipped in it, never paints over
   the response beside it. Its direction is its dir attribute's, and a line that reads the other way is an
   align-line with its own (handlers.text_html): no unicode-bidi: plaintext, which let a line's first character
   turn the line around */
.align-text { white-space: pre-wrap; overflow-wrap: anywhere; font-size: var(--text-md); line-height: 1.5;
              overflow-x: auto; contain: paint; padding-block: 0.25em; }
/* a whole line, ordered and aligned in its own direction; inline-block, not block: the text copied from the page
   (innerText) keeps the stored line breaks, where a block would add one on each side */
.align-line { display: inline-block; width: 100%; }
.align-cut { color: var(--body-text-color-subdued); font-style: italic; }
/* handlers.text_html's marker of a hidden or direction character, and its warning: read left to right as a unit */
.align-hidden { unicode-bidi: isolate; direction: ltr; font-family: var(--font-mono); font-size: 0.8em;
                color: var(--error-text-color, #b91c1c); border: 1px dashed currentColor; border-radius: 3px; padding: 0 2px; }
.align-warn { color: var(--error-text-color, #b91c1c); font-weight: 600; margin: 0 0 4px; }
/* the admin tab's reliability warnings (_reliability_warnings), above the per-annotator table they are about */
.align-warn-block { border: 2px solid var(--error-border-color, #ef4444); border-radius: 6px; padding: 8px 12px;
                    background: var(--error-background-fill, #fef2f2); }
.align-warn-block ul { margin: 0; padding-left: 1.2em; }
/* !important: Gradio's `.gradio-container-* .prose *` rule, more specific, drew a refusal in body grey */
.align-error { color: var(--error-text-color, #b91c1c) !important; }
/* PAGE_JS's live region: read by screen readers, drawn nowhere */
.align-sr-only { position: absolute; width: 1px; height: 1px; margin: -1px; padding: 0; overflow: hidden;
                 clip: rect(0 0 0 0); white-space: nowrap; border: 0; }
.align-pg-pane { min-height: 120px; }
.align-pg-turn { margin: 0 0 10px; }
.align-pg-turn .align-label { font-weight: 600; margin: 0 0 2px; }
.align-pg-user .align-label { color: var(--body-text-color-subdued); }
/* PAGE_JS's notices of a refused call and of a reload after a lost connection: over the page's foot, seen
   wherever the page is scrolled (the refusal over the other) */
#align-session-ended, #align-store-busy, #align-other-account, #align-reconnected { position: fixed; left: 0; right: 0;
  bottom: 0; z-index: 1000; margin: 0; padding: 12px 20px; font-family: var(--font);
  background: #fef3c7; color: #78350f; border-top: 2px solid #f59e0b; font-weight: 600; }
#align-session-ended, #align-store-busy, #align-other-account { z-index: 1001; }
/* room under the page's foot for a shown bar, which would cover its last controls (!important: Gradio sets the
   body's padding inline) */
body:has(> p[role][id^="align-"]:not([hidden])) { padding-bottom: 10em !important; }
/* while a bar says the server refuses this page's calls, Gradio's toasts only echo it: one per refused call
   ("Error (5)" over half a phone's screen, Submit included, after five rank clicks) */
body:has(> #align-session-ended:not([hidden]), > #align-store-busy:not([hidden]), > #align-other-account:not([hidden]))
  .toast-wrap { display: none !important; }
/* a submit or skip on its way (both buttons off: the page turns them off before the call): the task dimmed and out of
   the mouse's reach, as Gradio's progress overlay had it; a rank changed then was not the one submitted */
body:has(#align-submit:disabled):has(#align-skip:disabled) :is(.align-response, #align-pairwise, #align-all-bad,
  #align-rationale) { pointer-events: none; opacity: 0.6; }
/* the title on a phone: "labelling" broke mid-word at 390 px */
#align-title h1 { overflow-wrap: normal; word-break: keep-all; }
@media (max-width: 480px) { #align-title h1 { font-size: 1.25em; } }
"""

# Installed once per page by demo.load(js=...): the keyboard shortcuts, and the notice of a refused call.
# Selectors are the elem_ids set below.
#
# The notice: once a session ends, align/labeling/server.py refuses every call of the page (401) before
# Gradio or a handler sees it, and Gradio shows such a refusal of a call outside its queue nowhere (no
# toast; the event's chain just stops) and of a queued call only as a toast that fades. So the page
# watches its own calls: a 401 shows a notice that stays until a call sent after it is accepted
# (the annotator signed in again in another tab). Its text is ours, set as text, never HTML. A 503 (the store
# could not check the session: busy or unreachable) shows NOT_SAVED the same way, until a later call is accepted.
#
# After a call fails in transit (the network dropped, the server restarted), Gradio's page polls
# /gradio_api/app_id and reloads itself once it answers (align/labeling/server.py lets that through). The
# reloaded page shows what the store holds: a rank set while the connection was down, whose draft never
# arrived, is not shown as if it were saved. The page notes the poll (sessionStorage, this tab only) and
# the reloaded one says so, until the annotator submits, skips or clicks the notice.
PAGE_JS = """
() => {
  if (window.__alignKeys) return;
  window.__alignKeys = true;
  const style = document.createElement('style');
  style.textContent = %s;
  document.head.appendChild(style);
  const bar = (id, role, text) => {  // a notice at the foot of the page, its text set as text
    const p = document.createElement('p');
    p.id = id;
    p.setAttribute('role', role);
    p.textContent = text;
    p.hidden = true;
    return p;
  };
  const notice = bar('align-session-ended', 'alert', %s);
  document.body.appendChild(notice);
  const busy = bar('align-store-busy', 'alert', %s);
  document.body.appendChild(busy);
  // 403: this page's calls come from another account now (a sign-in as someone else in another tab): refused
  // until it is reloaded. The server's words name the account signed in; set as text.
  const other = bar('align-other-account', 'alert', %s);
  document.body.appendChild(other);
  const reconnected = bar('align-reconnected', 'status', %s);
  const remember = (flag) => { try { flag ? sessionStorage.setItem(reconnected.id, '1') : sessionStorage.removeItem(reconnected.id); } catch (e) {} };
  try { reconnected.hidden = sessionStorage.getItem(reconnected.id) !== '1'; } catch (e) { reconnected.hidden = true; }
  remember(false);
  reconnected.addEventListener('click', () => { reconnected.hidden = true; });
  document.body.appendChild(reconnected);
  const fetched = window.fetch;
  let sent = 0, refused = 0, failed = 0, foreign = 0;
  // While a refusal bar is shown, Gradio's toasts are hidden (CSS): each only echoed it. Those toasts are closed when
  // the bars go, or they came back as a pile ("Error (5)") over the page the moment a call was accepted.
  const refusing = () => !(notice.hidden && busy.hidden && other.hidden);
  const closeToasts = () => document.querySelectorAll('.toast-wrap .toast-close').forEach((b) => b.click());
  window.fetch = async (...args) => {
    const n = ++sent;
    const url = String((args[0] && args[0].url) || args[0]);
    if (url.includes('/gradio_api/app_id')) remember(true);  // Gradio reconnects: it reloads the page next
    const before = refusing();
    let response;
    try {
      response = await fetched(...args);
    } catch (e) {  // no answer at all (the server gone): not a refusal; Gradio's own "Connection lost" says it
      if (url.includes('/gradio_api/')) { notice.hidden = true; busy.hidden = true; }
      throw e;
    }
    if (url.includes('/gradio_api/')) {
      if (response.status === 401) { refused = n; notice.hidden = false; }
      else if (response.ok && n > refused) notice.hidden = true;  // not a call that was already on its way
      if (response.status === 503) { failed = n; busy.hidden = false; }
      else if (response.ok && n > failed) busy.hidden = true;
      if (response.status === 403) {
        foreign = n; other.hidden = false;
        response.clone().json().then((body) => {
          if (body && typeof body.detail === 'string') other.textContent = '\u26a0\ufe0f ' + body.detail;
        }).catch(() => {});
      } else if (response.ok && n > foreign) other.hidden = true;
      if (before && !refusing()) closeToasts();
    }
    return response;
  };
  const shown = (el) => !!el && el.offsetParent !== null;
  const byId = (id) => document.getElementById(id);
  const slots = () => [...'abcdefgh'].map((l) => byId('resp-' + l)).filter(shown);
  let sel = 0;
  // `scroll`: a selection made by key is scrolled into view (with eight responses E..H are below the fold)
  const mark = (scroll) => slots().forEach((el, i) => {
    el.classList.toggle('align-selected', i === sel);
    if (scroll && i === sel) el.scrollIntoView({block: 'nearest'});
  });
  // Screen readers and keyboards: each set of rank radios is a radiogroup named by its label ("Rank of A (1 =
  // best)"), each radio "Rank of A: 2" (Gradio names them "1", "2", ... only), and a group's radios share one
  // name (Gradio gives each its own, so Tab stopped on every radio and the arrow keys moved nowhere). Gradio
  // draws the radios again when a task changes their choices: an observer labels them again.
  const labelGroups = () => {
    for (const [id, name] of [...'abcdefgh'].map((l) => ['rank-' + l, 'Rank of ' + l.toUpperCase()])
                              .concat([['align-pairwise', '']])) {
      const group = byId(id);
      if (!group) continue;
      const label = group.querySelector('[data-testid="block-info"]');
      if (label && label.id !== id + '-label') label.id = id + '-label';
      if (group.getAttribute('role') !== 'radiogroup') group.setAttribute('role', 'radiogroup');
      if (label && group.getAttribute('aria-labelledby') !== label.id) group.setAttribute('aria-labelledby', label.id);
      for (const input of group.querySelectorAll('input[type=radio]')) {
        if (input.name !== id + '-choice') input.name = id + '-choice';
        if (name && input.getAttribute('aria-label') !== name + ': ' + input.value) input.setAttribute('aria-label', name + ': ' + input.value);
      }
    }
  };
  // Screen readers: a message the server answers with ("Saved. Next task.", "Not saved: ...", a rank refused) is read
  // out from a live region of the page's own; it was only drawn. Not #align-message itself: it also holds Gradio's
  // "processing | 0.3s" while a call runs, which would be read out at every tick. Each message has a tag of
  // its own (_note; Gradio keeps the element and changes what differs), so the same words after the next submit
  // are read again.
  const spoken = document.createElement('div');
  spoken.id = 'align-announce';
  spoken.className = 'align-sr-only';
  spoken.setAttribute('role', 'status');
  spoken.setAttribute('aria-live', 'polite');
  spoken.setAttribute('aria-atomic', 'true');
  document.body.appendChild(spoken);
  const heard = {};  // the number of the last message read out, by where it is shown
  const announce = () => {
    for (const id of ['align-message', 'align-admin-message', 'align-pg-status']) {
      const note = document.querySelector('#' + id + ' :is(p.align-note, p.align-error)');
      if (!note || heard[id] === note.dataset.note) continue;
      heard[id] = note.dataset.note;
      const text = note.textContent.trim();
      spoken.textContent = '';  // emptied first: the same words as the last message are a change too
      if (text) setTimeout(() => { spoken.textContent = text; }, 50);
    }
  };
  let labelling = false;
  new MutationObserver(() => {
    if (!labelling) { labelling = true; queueMicrotask(() => { labelling = false; labelGroups(); announce(); }); }
  }).observe(document.body, {childList: true, subtree: true, attributes: true, attributeFilter: ['name', 'data-note']});
  labelGroups();
  // The rationale box stops at its maxlength without a word (a paste past it is cut): the page says so below it
  // while the box is full. The note is made on demand, so a redraw of the box by Gradio loses nothing.
  document.addEventListener('input', (e) => {
    const box = e.target, block = byId('align-rationale');
    if (!block || !block.contains(box) || box.tagName !== 'TEXTAREA') return;
    const full = box.maxLength > 0 && box.value.length >= box.maxLength;
    let note = byId('align-rationale-full');
    if (!note && full) {
      note = document.createElement('p');
      note.id = 'align-rationale-full';
      note.className = 'align-error';
      note.setAttribute('role', 'status');
      note.textContent = %s;
      block.appendChild(note);
    }
    if (note) note.hidden = !full;
  }, true);
  const clickRadio = (id, value) => {
    const input = document.querySelector('#' + id + ' input[type=radio][value="' + value + '"]');
    if (input) input.click();
    return !!input;
  };
  // The focus and the selection go together: a response's rank radios reached by Tab select it (the digit keys then
  // ranked the response highlighted before, A, while the focus ring was on C's radios), and a letter or digit key
  // pressed with the focus on a response's radios takes the focus to the response it selects.
  document.addEventListener('focusin', (e) => {
    const slot = e.target.closest && e.target.closest('.align-response');
    const at = slot ? slots().indexOf(slot) : -1;
    if (at >= 0 && at !== sel) { sel = at; mark(); }
  });
  // An A/B task shows no rank radios: there the focus goes to the selected response's unsafe box (it stayed on A's
  // box while b highlighted B, and Space then ticked A's).
  const follow = (from) => {
    if (!(from && from.closest && from.closest('.align-response'))) return;
    const letter = 'abcdefgh'[sel], group = '#rank-' + letter;
    let target = document.querySelector(group + ' input[type=radio]:checked') || document.querySelector(group + ' input[type=radio]');
    if (!shown(target)) target = document.querySelector('#unsafe-' + letter + ' input[type=checkbox]');
    if (shown(target) && target !== from) target.focus({preventScroll: true});
  };
  // Each draft and each submit carries the page's stamp: this page's id and how many submits it has sent. A draft
  // sent before this page's submit (its rank set before it) may reach the server after it (another event's
  // queue): the server says nothing of it then, where it said "Not saved: already submitted" over "Saved".
  const pageId = Math.random().toString(36).slice(2, 12);
  let submits = 0;
  window.alignStamp = () => pageId + ':' + submits;
  // What the annotator changed of the task on screen (an unsafe box, All are bad, the rationale) goes with the
  // submit: that box's value is saved as the page shows it. The draft of an untick just made may land after the
  // submit (each event has a queue of its own), and the draft still ticked was kept over the page's untick; what
  // was not changed here keeps what another tab drafted. Taken from the DOM's own events: Gradio's updates (a task
  // drawn, a draft filled in) send none. Kept by task: a change made as the next task was drawn is not carried.
  let touchedTask = null, touched = new Set();
  const touchedId = (target) => {
    const box = target && target.closest && target.closest('[id^="unsafe-"], #align-all-bad, #align-rationale');
    if (!box) return null;
    return box.id === 'align-all-bad' ? 'all_bad' : box.id === 'align-rationale' ? 'rationale' : box.id;
  };
  const touch = (e) => {
    const id = touchedId(e.target);
    if (!id) return;
    const box = document.querySelector('#align-task-id input'), now = box ? box.value : '';
    if (now !== touchedTask) { touchedTask = now; touched = new Set(); }
    touched.add(id);
  };
  document.addEventListener('input', touch, true);
  document.addEventListener('change', touch, true);
  window.alignTouched = (task) => String(task) === touchedTask ? [...touched].join(',') : '';
  document.addEventListener('click', (e) => {
    const slot = e.target.closest && e.target.closest('.align-response');
    if (slot) { sel = Math.max(0, slots().indexOf(slot)); mark(); }
    const done = e.target.closest && e.target.closest('#align-submit, #align-skip');
    if (done && done.id === 'align-submit' && !done.disabled) submits++;
    // the button gives the focus back: left on Skip, the next task's Enter (submit) would click Skip
    if (done) {
      sel = 0; reconnected.hidden = true; setTimeout(() => { done.blur(); mark(); }, 300);
      // a rank radio keeps the focus through the next task's drawing: a space would rank that task; and the
      // rationale box after Ctrl+Enter: the next task's ranks typed by key (2 1 4 3) went into its rationale
      const focused = document.activeElement;
      if (focused && focused !== done && focused.closest && focused.closest('.align-response, #align-rationale')) {
        focused.blur();
      }
    }
  }, true);
  // The single-key shortcuts can be turned off (#align-keys); the choice is kept in this browser for its next pages.
  const KEYS_OFF = 'align-single-keys-off';
  const keysBox = () => document.querySelector('#align-keys input[type=checkbox]');
  const singleKeys = () => { const box = keysBox(); return !box || box.checked; };
  try {
    const box = keysBox();
    if (box && box.checked && localStorage.getItem(KEYS_OFF) === '1') box.click();
  } catch (err) {}  // storage refused (a privacy mode): on, as the page draws it
  document.addEventListener('change', (e) => {
    if (e.target === keysBox()) try { localStorage.setItem(KEYS_OFF, e.target.checked ? '0' : '1'); } catch (err) {}
  });
  // The keys wait SETTLE_MS after another task replaced the one on screen: a key pressed before the annotator
  // could see the new task was meant for the old one. (Gradio sets the hidden task handle's value, which no
  // MutationObserver sees: it is read every 100 ms.)
  const SETTLE_MS = 300;
  const taskOnScreen = () => { const box = document.querySelector('#align-task-id input'); return box ? box.value : ''; };
  let task = taskOnScreen(), replacedAt = 0;
  const watch = () => {
    const now = taskOnScreen();
    // "": no task yet (until the page's load fills it in)
    if (now !== task) {
      if (task !== '') replacedAt = Date.now();
      task = now; sel = 0; mark();
    }
  };
  // The new task is noticed as it is drawn: Gradio sets the handle in the same update as the prompt's text, so a
  // redraw of the prompt looks at the handle. (The 100 ms poll alone noticed it late on a busy machine and held back
  // keys pressed well after the new task showed; the time of the prompt block's last redraw, taken when the poll
  // saw the handle, was Gradio's loading overlay leaving that block up to ~200 ms after the new task showed.)
  new MutationObserver(watch).observe(byId('align-prompt') || document.body,
    {childList: true, subtree: true, characterData: true});
  setInterval(watch, 100);
  window.alignKeysReady = () => { watch(); return Date.now() - replacedAt >= SETTLE_MS; };  // the task settled
  // Enter on a checkbox (an unsafe box, All are bad): Gradio 6's checkbox flips itself on Enter (no draft saved) in
  // its own handler, which runs before the page's below, so the submit sent the flipped box: Tab to D's unticked
  // box, Enter stored D unsafe. Taken here first (capture) and never passed on: it submits the boxes as shown, or,
  // pressed before the next task settled, does nothing. With the single keys off (or with Alt) Enter flips the box,
  // as Gradio's does.
  document.addEventListener('keydown', (e) => {
    const t = e.target, submit = byId('align-submit');
    if (e.key !== 'Enter' || !(t && t.tagName === 'INPUT' && t.type === 'checkbox') || !shown(submit)) return;
    if (e.isComposing || e.keyCode === 229) return;
    const ctrl = e.ctrlKey || e.metaKey;
    // Left to Gradio, Enter flips the box in its own code with no input or change event: no draft was saved and the
    // submit kept the draft's tick over the page's untick. The same flip as a click, with the box's events.
    if (!ctrl && (e.altKey || !singleKeys())) { e.stopPropagation(); e.preventDefault(); t.click(); return; }
    e.stopPropagation();
    e.preventDefault();
    watch();
    if (ctrl || Date.now() - replacedAt >= SETTLE_MS) { submit.click(); sel = 0; }
  }, true);
  document.addEventListener('keydown', (e) => {
    const submit = byId('align-submit');
    if (!shown(submit)) return;
    const t = e.target;
    if (e.isComposing || e.keyCode === 229) return;  // an input method composing a character: its keys, not ours
    const typing = t && (t.tagName === 'TEXTAREA' || t.isContentEditable ||
      (t.tagName === 'INPUT' && !['radio', 'checkbox'].includes(t.type)));
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); submit.click(); sel = 0; return; }
    watch();
    if (typing || e.ctrlKey || e.metaKey || Date.now() - replacedAt < SETTLE_MS) return;
    const key = e.key.toLowerCase();
    // Skip is Alt+S, never a bare key: a stray "s" (a rationale typed before its box had the focus) skipped a
    // ranked task for good. e.code: Option+S on a Mac types "ß".
    if (e.altKey) {
      if (!e.shiftKey && (e.code === 'KeyS' || key === 's')) { e.preventDefault(); byId('align-skip').click(); sel = 0; }
      return;
    }
    if (!singleKeys()) return;  // turned off: letters, digits and Enter are the browser's and the page's own
    // Enter on a focused button or link (the guidelines' links) is theirs
    if (key === 'enter') { if (t.closest && t.closest('button, a[href]')) return; e.preventDefault(); submit.click(); sel = 0; return; }
    const list = slots();
    if (sel >= list.length) sel = 0;
    // u: the selected response's own Unsafe box (each response has one; the store keeps which response it is)
    if (key === 'u' || key === 'x') {
      const box = document.querySelector((key === 'u' ? '#unsafe-' + 'abcdefgh'[sel] : '#align-all-bad') + ' input[type=checkbox]');
      if (shown(box)) { e.preventDefault(); box.click(); }
      return;
    }
    // a letter selects its response on an A/B task too: u then flags it
    const letter = 'abcdefgh'.indexOf(key);
    if (key.length === 1 && letter >= 0 && letter < list.length) { e.preventDefault(); sel = letter; mark(true); follow(t); return; }
    if (shown(byId('align-pairwise'))) {
      const options = document.querySelectorAll('#align-pairwise input[type=radio]');
      const n = parseInt(key, 10);
      if (n >= 1 && n <= options.length) { e.preventDefault(); options[n - 1].click(); }
      return;
    }
    const rank = parseInt(key, 10);
    if (rank >= 1 && rank <= list.length) {
      e.preventDefault();
      if (clickRadio('rank-' + 'abcdefgh'[sel], String(rank))) sel = Math.min(sel + 1, list.length - 1);
      mark(true);
      follow(t);
    }
  });
}
"""


RATIONALE_FULL = (f"A rationale holds at most {handlers.MAX_RATIONALE:,} characters: this one is full, and text "
                  "typed or pasted past that was not taken.")
OTHER_ACCOUNT = ("This page was opened for another account than the one now signed in in this browser (a sign-in "
                 "in another tab): nothing from it is saved. Reload it to rank as the account signed in.")
RECONNECTED = ("The connection to the server was lost and the page has reloaded: it shows what is saved. A rank, "
               "flag or rationale set while the connection was down may be missing: check them, then submit.")


def stamped(n: int, touched: bool = False) -> str:
    """The js of an event with `n` inputs, the last the page's stamp: it sends the stamp as it is when sent.
    `touched`: the one before it is what the annotator changed of the task on the page (its first input, the task)."""
    if touched:
        return (f"(...a) => [...a.slice(0, {n - 2}), window.alignTouched ? window.alignTouched(a[0]) : '', "
                "window.alignStamp ? window.alignStamp() : '']")
    return f"(...a) => [...a.slice(0, {n - 1}), window.alignStamp ? window.alignStamp() : '']"


STAMP_CHARS = 64  # of a page's stamp read, and kept: "page id:submits sent" is ~25


class PageSubmits:
    """The stamp (PAGE_JS alignStamp: "page id:submits sent") of the submit that saved each annotator's ranking of a
    task, the latest `size` kept: a draft of that task refused after it (submitted) was sent before it when it
    comes from the same page with fewer submits sent. Its ranks were set before the submit (Gradio runs each
    event in a queue of its own, so a draft sent first can land second): no "Not saved" over the "Saved"."""

    def __init__(self, size: int = 10_000):
        self.size, self._stamps, self._lock = size, collections.OrderedDict(), threading.Lock()

    def sent(self, annotator_id: int, task_id: int, stamp: str | None) -> str | None:
        """Record the stamp of a submit about to be made; the one it replaces is returned (for `put_back`). As much
        of it as `_stamp` reads: a stamp padded to 900 kB kept that much per task (a few MB a minute, one account)."""
        if not _stamp(stamp):
            return None
        stamp = stamp[:STAMP_CHARS]
        with self._lock:
            previous = self._stamps.get((annotator_id, task_id))
            self._stamps[annotator_id, task_id] = stamp
            self._stamps.move_to_end((annotator_id, task_id))
            while len(self._stamps) > self.size:
                self._stamps.popitem(last=False)
        return previous

    def put_back(self, annotator_id: int, task_id: int, stamp: str | None, previous: str | None) -> None:
        """Undo `sent` of `stamp` (the submit saved nothing of this page's: refused, failed, another tab's kept)."""
        if not _stamp(stamp):  # none was recorded (a request is untrusted: a stamp of null, of junk)
            return
        stamp = stamp[:STAMP_CHARS]
        with self._lock:
            if self._stamps.get((annotator_id, task_id)) != stamp:
                return
            if previous is None:
                self._stamps.pop((annotator_id, task_id), None)
            else:
                self._stamps[annotator_id, task_id] = previous

    def sent_before(self, annotator_id: int, task_id: int, stamp: str | None) -> bool:
        with self._lock:
            submit = self._stamps.get((annotator_id, task_id))
        draft, saved = _stamp(stamp), _stamp(submit)
        return bool(draft and saved) and draft[0] == saved[0] and draft[1] < saved[1]


def _stamp(stamp: str | None) -> tuple[str, int] | None:
    """("page id", submits) from a page's stamp; None for none or a malformed one (a request is untrusted)."""
    page, _, count = (stamp if isinstance(stamp, str) else "")[:STAMP_CHARS].partition(":")
    return (page, int(count)) if page and count.isdigit() and len(count) <= 9 else None


def _js() -> str:
    return PAGE_JS % (json.dumps(CSS), json.dumps(f"⚠️ {SESSION_ENDED}"), json.dumps(f"⚠️ {STORE_BUSY_BAR}"),
                      json.dumps(f"⚠️ {OTHER_ACCOUNT}"), json.dumps(f"⚠️ {RECONNECTED}"),
                      json.dumps(f"⚠️ {RATIONALE_FULL}"))


def _table(rows: list[dict] | None) -> Any:
    import pandas as pd

    frame = pd.DataFrame(rows or [])
    return frame.fillna("") if not frame.empty else frame


def _num(value: Any, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _totals(stats: dict) -> str:
    totals, people = stats.get("totals", {}), stats.get("per_annotator") or []
    rates = [p["per_hour"] for p in people if p.get("per_hour")]
    seconds = [p["mean_seconds"] for p in people if p.get("mean_seconds") is not None]
    # Their rates added: the team's rankings per hour when they all work at once (time on task)
    throughput = f"**{sum(rates):.1f}** rankings/hour" if rates else "— (too few timed rankings yet)"
    return (f"**{totals.get('tasks', 0)}** tasks · **{totals.get('rankings', 0)}** rankings · "
            f"**{totals.get('annotators', 0)}** active annotators · throughput {throughput}"
            + (f" · **{sum(seconds) / len(seconds):.0f} s** per task on average" if seconds else ""))


def _agreement(agreement: dict) -> str:
    if not agreement.get("n_tasks"):
        return "**Agreement:** no task has two rankings yet (raise `--overlap` to measure it)."
    return (f"**Agreement** over {agreement['n_tasks']} tasks ranked by two or more annotators: "
            f"Krippendorff α (ordinal) **{_num(agreement.get('krippendorff_alpha'))}** · "
            f"pairwise agreement **{_num(agreement.get('pairwise_agreement'))}** · "
            f"Kendall τ-b **{_num(agreement.get('kendall_tau'))}**")


SESSION_ENDED = auth.SESSION_ENDED[:1].upper() + auth.SESSION_ENDED[1:] + "."
# A store that cannot answer (SQLite's write lock held past its 30 s busy timeout by another process,
# PostgreSQL unreachable): the handlers say so in these words and log the detail, never the exception's
# own text (SQL, parameters, paths).
STORE_ERRORS = (SQLAlchemyError, OSError)
NOT_SAVED = ("Not saved: the store is busy or unreachable. Your ranks are still on this page; "
             "press Submit again in a moment.")
NOT_SKIPPED = "Not skipped: the store is busy or unreachable. Press Skip again in a moment."
# The bar a 503 shows (PAGE_JS): for whichever call the server refused before any handler, a submit, a skip, a rank's
# draft or the admin's refresh; NOT_SAVED's "press Submit" fitted only the first.
STORE_BUSY_BAR = ("Not saved: the store is busy or unreachable. This page keeps your ranks: in a moment, press "
                  "again what you pressed (Submit, Skip or Refresh).")
NO_TASK = "The store is busy or unreachable, so no task could be fetched: reload the page in a moment."


def _reliability_warnings(warnings: list[str] | None) -> str:
    """handlers.admin_stats' warnings as one block of HTML, every character escaped (they quote annotator names,
    which whoever an account was made for chose); empty when there are none."""
    if not warnings:
        return ""
    items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    return (f'<div class="align-warn-block" role="alert"><p class="align-warn">⚠️ Reliability: {len(warnings)} '
            f'annotator{"s" * (len(warnings) != 1)} estimated above chance but below it on the gold tasks</p>'
            f"<ul>{items}</ul></div>")


def _note_tag() -> str:
    """A message's tag for PAGE_JS: random letters, no count (a counter shared by every page told an annotator how
    many messages others were given) and no digit (a page's text carries no number that could be a task id)."""
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(10))


def _note(text: str, icon: str = "", error: bool = False) -> str:
    """A message for the page as HTML, every character of `text` escaped (it may quote what a client sent). Each
    has a tag of its own (_note_tag): PAGE_JS reads out a message with a new tag, even when its words are the last one's
    ("Saved. Next task." after each submit changed nothing on the page, and a screen reader said nothing)."""
    return (f'<p class="{"align-error" if error else "align-note"}" data-note="{_note_tag()}">'
            f'{icon} {html.escape(text)}</p>')


def _cookie(request: gr.Request | None) -> str | None:
    """The session cookie of the HTTP request behind a Gradio event."""
    if request is None:
        return None
    cookies = getattr(request, "cookies", None)
    try:
        return cookies[auth.COOKIE] if cookies is not None and auth.COOKIE in cookies else None
    except (KeyError, TypeError):
        return None


def _export_summary(folder: str, summary: dict) -> str:
    dropped = ", ".join(f"{k.removeprefix('dropped_').replace('_', ' ')} {v}" for k, v in summary.items()
                        if k.startswith("dropped_") and v) or "none"
    gold = summary.get("gold_rankings")
    counted = (f"from {summary.get('rankings', 0)} rankings of {summary.get('tasks', 0)} tasks · "
               f"mean agreement {_num(summary.get('mean_agreement'))} · dropped: {dropped}"
               + (f" · {gold} rankings of gold tasks scored the annotators" if gold else ""))
    # Rankings flagged as a whole (all are bad; unsafe naming no reply), yet in the pairs: only under keep, the
    # default (drop leaves their tasks out, so the count is 0). A reply flagged unsafe is the unsafe rule's, below.
    if summary.get("flagged_pairs"):
        kept = summary.get("flagged_rankings", 0) - summary.get("dropped_flagged", 0)
        counted += (f" · kept {summary['flagged_pairs']} pairs from {kept} rankings flagged all are bad "
                    "(export.flagged=keep; align export flagged=drop leaves their tasks out, and the Export button "
                    "then does too)")
    if summary.get("unsafe_pairs"):  # the unsafe rule's pairs (export.unsafe_rule), said with how many it turned
        counted += (f" · {summary['unsafe_pairs']} pairs put a reply flagged unsafe on the rejected side "
                    f"({summary.get('unsafe_overridden', 0)} against the ranks)")
    return (f"<p class='align-note'><b>Exported</b> {summary['pairs']} pairs (train {summary.get('train_pairs', '?')}, "
            f"test {summary.get('test_pairs', '?')}) to <code>{html.escape(folder)}</code> {html.escape(counted)}</p>")


def build_app(store, guidelines_md: str | None = None, *, secret: bytes, overlap: int = 1, gold_rate: float = 0.0,
              batch: str | None = None, export: Callable[[], dict] | None = None,
              export_dir: str | Path | None = None, playground: ServeClient | None = None) -> gr.Blocks:
    """The annotator and admin screens on `store`; `guidelines_md` defaults to align/labeling/guidelines.md.

    `secret` is the store's cookie key (`Store.secret`); `overlap`, `gold_rate` and `batch` go to
    handlers.next_task. `export` runs `align export` on the run's preferences folder `export_dir`
    (injected by `align label`, align/labeling/cli.py); without it the admin tab says which command to run.
    `playground` (the client of an `align serve` endpoint, `align label --serve-url`) adds the
    Playground tab: two served models side by side (align/labeling/playground.py).
    """
    guidelines_md = guidelines_md if guidelines_md is not None else GUIDELINES.read_text()
    exporting = threading.Lock()  # one export at a time: two admins clicking would write one folder twice
    submitted = PageSubmits()  # the stamp of each submit: a draft sent before it lands after it in silence

    def signed_in(request: gr.Request | None) -> dict | None:
        return auth.session_of(store, secret, _cookie(request))

    with gr.Blocks(title="align · labelling") as demo:
        shown_at = gr.State(0.0)  # time.monotonic() when the task on screen was shown (only for `seconds`)

        with gr.Row():
            gr.Markdown("# align · labelling", elem_id="align-title")  # the page's h1, as the sign-in page's
            who = gr.HTML("", elem_id="align-who")
            # A real form post: the server ends the session, clears the cookie and shows the sign-in page.
            sign_out = gr.Button("Sign out", size="sm", scale=0, min_width=100, elem_id="align-signout")

        with gr.Tabs(elem_id="align-tabs"):
            with gr.Tab("Label", id="label", elem_id="align-label-tab"):
                with gr.Accordion("Guidelines", open=False, elem_id="align-guidelines"):
                    gr.Markdown(guidelines_md)
                progress = gr.Markdown("", elem_id="align-progress")
                # The task on screen, as an opaque handle (handlers.task_handle): submit, skip and drafts name it,
                # the server finds it among the annotator's tasks. Never the id: gold tasks' ids are out of sequence.
                # One line: an <input>, as PAGE_JS reads it.
                task_id = gr.Textbox("", lines=1, max_lines=1, visible="hidden", elem_id="align-task-id")
                # The account the page was drawn for: submit, skip and drafts refuse when the cookie is another's
                # now (another tab of the browser signed in as someone else; after a restart nothing else says).
                opened_by = gr.Textbox("", visible="hidden", elem_id="align-opened-by")
                # The fingerprint of the order the page shows the responses in (handlers.order_tag): submit and
                # drafts send it back, refused when the server's order changed since (an update): the ranks
                # would be mapped through the new order onto the wrong responses. It tells nothing of the order.
                order_tag = gr.Textbox("", visible="hidden", elem_id="align-order-tag")
                # The page's stamp (PAGE_JS alignStamp: its id, its submits so far), set by each draft's and submit's
                # js as it is sent: a draft sent before the page's own submit says nothing when it lands after it.
                page_stamp = gr.Textbox("", visible="hidden", elem_id="align-page-stamp")
                # What the annotator changed on this page (PAGE_JS alignTouched), set by the submit's js: that box's
                # value is the one saved, not the draft's, which its own change may not have reached yet.
                page_touched = gr.Textbox("", visible="hidden", elem_id="align-page-touched")
                prompt = gr.HTML("", elem_id="align-prompt")
                slots, bodies, ranks, unsafes = [], [], [], []
                for row_start in range(0, MAX_K, 2):
                    with gr.Row(equal_height=True):
                        for i in range(row_start, row_start + 2):
                            letter = LETTERS[i]
                            with gr.Column(visible=False, elem_id=f"resp-{letter.lower()}",
                                           elem_classes=["align-response"]) as slot:
                                gr.Markdown(f"### {letter}", elem_classes=["align-letter"])
                                bodies.append(gr.HTML("", elem_classes=["align-body"]))
                                # Every rank a task can have, though a task shows only 1..K: Gradio checks a
                                # value against the choices of the page's server-side session, which it forgets
                                # when it holds 10,000 newer ones; the page must still submit (the handler
                                # checks ranks against K).
                                ranks.append(gr.Radio(RANK_CHOICES, label=f"Rank of {letter} (1 = best)",
                                                      elem_id=f"rank-{letter.lower()}"))
                                # Which reply is unsafe, not only that one is: the submit and the draft send the
                                # shown slot, the server stores the reply's canonical index (handlers.unsafe_flags)
                                unsafes.append(gr.Checkbox(label=f"{letter} is unsafe (harmful, leaks data, "
                                                                 "dangerous advice)", elem_id=f"unsafe-{letter.lower()}"))
                            slots.append(slot)
                pairwise = gr.Radio(PAIRWISE, label="Which response is better?", visible=False,
                                    elem_id="align-pairwise")
                with gr.Row():
                    all_bad = gr.Checkbox(label="All are bad", elem_id="align-all-bad")
                rationale = gr.Textbox(label=f"Rationale (optional, at most {handlers.MAX_RATIONALE:,} characters)",
                                       lines=2, elem_id="align-rationale",
                                       max_length=handlers.MAX_RATIONALE)
                with gr.Row():
                    submit = gr.Button("Submit", variant="primary", elem_id="align-submit")
                    skip = gr.Button("Skip", elem_id="align-skip")
                message = gr.HTML("", elem_id="align-message")
                gr.Markdown(SHORTCUTS, elem_id="align-shortcuts")
                # WCAG 2.1.4: a shortcut of one character key can be turned off (speech input types letters and
                # digits; a screen reader's browse mode has keys of its own). PAGE_JS reads it at each key and keeps
                # the choice in the browser (localStorage), for the next page too.
                gr.Checkbox(True, label="Single-key shortcuts (letters, digits, Enter)", interactive=True,
                            elem_id="align-keys")

            with gr.Tab("Admin", id="admin", visible=False, elem_id="align-admin-tab") as admin_tab:
                with gr.Row(equal_height=True):
                    totals = gr.Markdown("", elem_id="align-totals")
                    refresh = gr.Button("Refresh", size="sm", scale=0, min_width=100, elem_id="align-refresh")
                admin_message = gr.HTML("", elem_id="align-admin-message")
                # Above the table: an estimate that contradicts the gold answers is the one thing to act on here.
                reliability_warnings = gr.HTML("", elem_id="align-reliability-warnings")
                per_annotator = gr.Dataframe(label="Per annotator", interactive=False,
                                             elem_id="align-per-annotator")
                per_batch = gr.Dataframe(label="Per batch", interactive=False, elem_id="align-per-batch")
                agreement = gr.Markdown("", elem_id="align-agreement")
                folder = str(export_dir or "runs/quickstart/preferences")
                # No path box: the export always goes to the run's preferences folder (align export's).
                # HTML with the path escaped: a folder name is text (in Markdown a backtick in it would
                # close the code span and let the rest be markup).
                folder_note = (f"Export folder: <code>{html.escape(folder)}</code> (the run's preferences, as "
                               "<code>align export</code> writes them)" if export else
                               f"Export with <code>align export</code> (it writes <code>{html.escape(folder)}</code>).")
                with gr.Row(equal_height=True):
                    # Empty in the layout: /config, which every signed-in page fetches, holds each component's
                    # value, and the Admin tab is only hidden. do_load fills it in for an admin.
                    export_dir_note = gr.HTML("", elem_id="align-export-dir")
                    export_button = gr.Button("Export preference dataset", variant="primary", visible=export is not None,
                                              elem_id="align-export", scale=0, min_width=240)
                # HTML, escaped: a refusal quotes batch and file names from outside the app.
                export_summary = gr.HTML("", elem_id="align-export-summary")

            pg_load_outputs = []  # what do_load sets of the Playground tab
            if playground is not None:
                # Hidden, and empty of the endpoint's URL (/config holds each component's value), until do_load
                # shows it to an account that may use it now (handlers.playground_open: while blind A/B tasks are
                # open, admins only).
                with gr.Tab("Playground", id="playground", visible=False,
                            elem_id="align-playground-tab") as playground_tab:
                    pg_intro = gr.HTML("", elem_id="align-pg-intro")
                    with gr.Row(equal_height=True):
                        # allow_custom_value: Gradio checks a value against the choices it recorded for the page,
                        # which a restart loses; send checks the names itself
                        pg_left = gr.Dropdown([], value=None, label="Left model", elem_id="align-pg-left-model",
                                              allow_custom_value=True)
                        pg_right = gr.Dropdown([], value=None, label="Right model", elem_id="align-pg-right-model",
                                               allow_custom_value=True)
                        pg_temperature = gr.Slider(0.0, 1.5, value=0.7, step=0.1, label="Temperature (0: greedy)",
                                                   elem_id="align-pg-temperature")
                    with gr.Row(equal_height=True):
                        pg_panes = [gr.HTML(conversation_html([]), elem_id=f"align-pg-{side}",
                                            elem_classes=["align-response", "align-pg-pane"])
                                    for side in ("left", "right")]
                    pg_message = gr.Textbox(label="Message", lines=2, max_lines=8, elem_id="align-pg-message")
                    with gr.Row():
                        pg_send = gr.Button("Send", variant="primary", elem_id="align-pg-send")
                        pg_clear = gr.Button("Clear", elem_id="align-pg-clear")
                    pg_status = gr.HTML("", elem_id="align-pg-status")
                    pg_histories = gr.State(([], []))  # this browser's two conversations
                pg_intro_text = (f"Two models served at <code>{html.escape(playground.url)}</code> answer the same "
                                 "conversation side by side; each pane keeps its own model's answers. Model text is "
                                 "shown as plain text.")
                pg_load_outputs = [playground_tab, pg_intro]

        # ---- events: thin adapters from widgets to handlers -------------------------------------
        task_outputs = [task_id, opened_by, order_tag, shown_at, progress, prompt, *slots, *bodies, *ranks, pairwise,
                        all_bad, *unsafes, rationale, submit]
        unchanged = [gr.skip()] * len(task_outputs)

        def show(next_: dict | None, sess: dict | None, idle: bool = False) -> list:
            """Updates for `task_outputs` that put `next_` (or the all-done screen; `idle`: an admin's page with
            no task asked for yet) on the page of `sess`'s account."""
            account = sess["name"] if sess else ""
            blank = [gr.update(visible=False)] * MAX_K
            if next_ is None:
                # no prompt (its accent border was left as a stub), no All are bad or rationale to fill in; "hidden",
                # not False: kept in the page (False takes them out, and PAGE_JS's observer of the prompt with them)
                return ["", account, "", 0.0, "No task is held for you as an admin until you ask: press *Skip* to be given one."
                        if idle else "**All done.** Nothing is left for you to label; thank you! When new tasks "
                        "come, reload the page (or press *Skip*) to get them.",
                        gr.update(visible="hidden", value=""), *blank, *[gr.update(value="")] * MAX_K,
                        *[gr.update(value=None)] * MAX_K, gr.update(visible=False, value=None),
                        gr.update(visible="hidden", value=False), *[False] * MAX_K,
                        gr.update(visible="hidden", value=""), gr.update(interactive=False)]
            responses, k = next_["responses"], len(next_["responses"])
            is_pair = next_.get("kind") == "pairwise"
            done, assigned = next_["progress"]["done"], next_["progress"]["assigned"]
            choices = [str(r) for r in range(1, k + 1)]
            # a partial ranking saved earlier (handlers.next_task's "draft"), so a reload loses nothing
            draft = (next_.get("draft") or []) + [None] * MAX_K
            flagged = (next_.get("draft_unsafe") or []) + [False] * MAX_K  # shown order, as the boxes
            return [
                next_["handle"], account, next_["order_tag"], time.monotonic(),
                f"**Progress:** {done} / {assigned} done"
                + (f" ({next_['progress']['skipped']} skipped)" if next_["progress"].get("skipped") else "")
                + (f" · task {next_['task_id']}" if sess and sess.get("is_admin") else "")  # the admin's own view
                + " · "
                + ("A/B comparison" if is_pair else f"rank {k} responses, ties allowed"),
                gr.update(visible=True, value='<p class="align-label">Customer:</p>' + handlers.text_html(next_["prompt"])),
                *[gr.update(visible=i < k) for i in range(MAX_K)],
                *[gr.update(value=handlers.text_html(responses[i], cut_off=next_["cut_off"][i]) if i < k else "")
                  for i in range(MAX_K)],
                *[gr.update(choices=choices, value=str(draft[i]) if draft[i] else None, visible=not is_pair)
                  for i in range(MAX_K)],
                gr.update(visible=is_pair, value=handlers.pairwise_verdict(next_.get("draft"), next_.get("draft_flags", []))
                          if is_pair else None),
                # the draft's flags and rationale come back with its ranks
                gr.update(value=not is_pair and "all_bad" in next_.get("draft_flags", []), visible=not is_pair),
                *[bool(flagged[i]) for i in range(MAX_K)], gr.update(visible=True, value=next_.get("draft_rationale", "")),
                gr.update(interactive=True),
            ]

        def next_for(sess: dict, new: bool = True) -> dict | None:
            found = handlers.next_task(store, sess, overlap=overlap, gold_rate=gold_rate, batch=batch, new=new)
            if found is not None and len(found["responses"]) > MAX_K:
                raise gr.Error(f"this task has {len(found['responses'])} responses; "
                               f"the app lays out at most {MAX_K}")
            return found

        signed_out = _note(SESSION_ENDED, "⚠️", error=True)

        def pg_shown(on: bool) -> list:
            """Updates for `pg_load_outputs`: the Playground tab and its intro shown (`on`) or hidden."""
            return [gr.update(visible=on), pg_intro_text if on else ""] if playground is not None else []

        def do_load(request: gr.Request):
            try:
                sess = signed_in(request)
                if sess is None:
                    return ["", gr.update(visible=False), "", signed_out, *show(None, None), *pg_shown(False)]
                admin = bool(sess.get("is_admin"))
                # An admin's page load holds no new task (one who only watches the Admin tab kept a slot from
                # the annotators, and `align pipeline label=human` waiting); a task the admin took stays on the page.
                task = next_for(sess, new=not admin)
                pg_on = playground is not None and handlers.playground_open(store, sess, overlap=overlap)
            except STORE_ERRORS:
                log.exception("page load: the store failed")
                return ["", gr.update(visible=False), "", _note(NO_TASK, "⚠️", error=True), *unchanged,
                        *pg_shown(False)]
            return [f"Signed in as <b>{html.escape(sess['name'])}</b>{' (admin)' if admin else ''}",
                    gr.update(visible=admin), folder_note if admin else "", "", *show(task, sess, idle=admin),
                    *pg_shown(pg_on)]

        demo.load(do_load, None, [who, admin_tab, export_dir_note, message, *task_outputs, *pg_load_outputs])
        sign_out.click(None, None, None, js="""() => {
          const form = document.createElement('form');
          form.method = 'post'; form.action = 'logout';
          document.body.appendChild(form); form.submit();
        }""")

        def moved_on(sess: dict, note: str) -> list:
            """`note` and the next task on the page; when the store cannot hand one out, `note` and what to do."""
            try:
                found = next_for(sess)
                if found is None:  # the handlers' "Saved. Next task." (and its kin) over the all-done screen
                    note = note.replace("Next task.", "That was your last task.").replace(
                        "; your next task is below", "")
                return [note, *show(found, sess)]
            except STORE_ERRORS:
                log.exception("no next task for %s: the store failed", sess["name"])
                return [note + _note(NO_TASK, "⚠️", error=True), *unchanged]

        def do_submit(request: gr.Request, current, page_account, page_order, started, *values):
            rank_values, (verdict, bad), unsafe_values = values[:MAX_K], values[MAX_K:MAX_K + 2], values[MAX_K + 2:-3]
            why, touched, stamp = values[-3:]
            try:
                sess = signed_in(request)
                if sess is None:
                    return [signed_out, *unchanged]
                handlers.check_page_account(sess, page_account)
                current = handlers.task_of(store, sess, current)
                # before the submit: a draft of this page's refused as it commits is not said to be lost
                previous = submitted.sent(sess["annotator_id"], current, stamp)
                try:
                    result = handlers.submit(
                        store, sess, current, list(rank_values), verdict=verdict, all_bad=bool(bad),
                        unsafe_shown=[bool(v) for v in unsafe_values], rationale=why or "",
                        touched=touched if isinstance(touched, str) else "",
                        order_tag=page_order or "",  # a page without one is stale
                        # 0 when this session's state was lost (it only feeds throughput)
                        seconds=round(time.monotonic() - started, 2) if started else 0.0)
                except BaseException:
                    submitted.put_back(sess["annotator_id"], current, stamp, previous)
                    raise
                if result.get("conflict"):  # another tab's ranking is the one kept
                    submitted.put_back(sess["annotator_id"], current, stamp, previous)
            except handlers.NotOpen as err:  # skipped or handed on (another tab, 30 minutes): on to the next task
                return moved_on(sess, _note(str(err).strip("'\""), "⚠️", error=True))
            except (ValueError, KeyError, PermissionError, handlers.AuthError, handlers.StaleOrder) as err:
                return [_note(str(err).strip("'\""), "⚠️", error=True), *unchanged[:-1], gr.update(interactive=True)]
            except STORE_ERRORS:
                log.exception("submit of task %s not saved: the store failed", current)
                return [_note(NOT_SAVED, "⚠️", error=True), *unchanged[:-1], gr.update(interactive=True)]
            if result.get("conflict"):  # another tab submitted this task with other ranks: on to the next
                return moved_on(sess, _note(result["message"], "⚠️", error=True))
            # A repeat of a submit already saved ("already saved"): the next task too. A second tab left on the
            # task submitted in the first stayed there, its Submit answered "already saved" again and again; a
            # replayed request whose page shows the next task by now gets that task again (the open one first).
            return moved_on(sess, _note(result["message"], "✅"))

        def drafting(own: str | int):
            """Every rank, flag and rationale the annotator sets is kept as a draft (never over a submitted
            ranking), each from its own widget only: `own` "rank:<i>", the rank radios of shown slot i; an int, the
            Unsafe box of that shown slot; "all_bad", "rationale", "verdict". A draft of one says nothing of the
            others: a second tab that may not show them as set leaves them as saved, and this page's draft of D's
            rank, sent before C was ranked again and landing after C's (each event has a queue of its own), no
            longer wrote C's old rank back."""
            rank_slot = int(own[5:]) if isinstance(own, str) and own.startswith("rank:") else None

            def do_draft(request: gr.Request, current, page_account, page_order, *values):
                value, stamp = values[MAX_K], values[-1]
                rank_values = [value if i == rank_slot else None for i in range(MAX_K)]
                if rank_slot is not None and value in (None, ""):  # nothing to keep (a task just drawn: no rank)
                    return gr.skip()
                given = {"all_bad": {"all_bad": bool(value)}, "rationale": {"rationale": value or ""},
                         "verdict": {"verdict": value}}.get(own, {} if rank_slot is not None else
                                                                {"unsafe_reply": (own, bool(value))})
                try:
                    sess = signed_in(request)
                    if sess is None:
                        return signed_out
                    if not current:
                        return gr.skip()
                    handlers.check_page_account(sess, page_account)
                    current = handlers.task_of(store, sess, current)
                    if not handlers.save_draft(store, sess, current, list(rank_values), order_tag=page_order or "",
                                               **given):
                        # the task is no longer this annotator's (submitted, skipped, expired): said now, not at
                        # Submit; not when this page's own submit of it was sent after this draft
                        if submitted.sent_before(sess["annotator_id"], current, stamp):
                            return gr.skip()
                        note = handlers.late_draft_note(store, sess, current, list(rank_values),
                                                        verdict=given.get("verdict"),
                                                        unsafe_reply=given.get("unsafe_reply"),
                                                        all_bad=given.get("all_bad"), rationale=given.get("rationale"))
                        return _note(note, "⚠️", error=True) if note else gr.skip()
                except (handlers.AuthError, handlers.StaleOrder) as err:  # shown: the annotator must reload
                    return _note(str(err), "⚠️", error=True)
                except (ValueError, KeyError, PermissionError) as err:
                    log.warning("draft of task %s not saved: %s", current, err)
                except STORE_ERRORS:
                    log.exception("draft of task %s not saved: the store failed", current)
                    return _note(NOT_SAVED, "⚠️", error=True)
                return gr.skip()

            return do_draft

        # .input: the annotator's own clicks and keys, not the updates show() makes. The rationale's .change: Gradio
        # 6's Textbox sends no .input for a deletion (Backspace, Delete, select all + Delete), so a rationale cleared
        # or cut short was never drafted, came back on a reload and was kept by the submit (store.keep_draft);
        # .change also fires as show() fills the box with a task's draft, which drafts that same text again.
        for widget, own in [*((w, f"rank:{i}") for i, w in enumerate(ranks)), (all_bad, "all_bad"),
                            *((w, i) for i, w in enumerate(unsafes)), (rationale, "rationale"), (pairwise, "verdict")]:
            inputs = [task_id, opened_by, order_tag, *ranks, widget, page_stamp]
            (widget.change if own == "rationale" else widget.input)(
                drafting(own), inputs, message, js=stamped(len(inputs)), trigger_mode="always_last",
                show_progress="hidden")

        def do_skip(current, page_account, request: gr.Request):
            try:
                sess = signed_in(request)
                if sess is None:
                    return [signed_out, *unchanged]
                handlers.check_page_account(sess, page_account)
                if current:
                    handlers.skip(store, sess, handlers.task_of(store, sess, current))
            except (ValueError, PermissionError, handlers.AuthError) as err:
                return [_note(str(err), "⚠️", error=True), *unchanged]
            except STORE_ERRORS:
                log.exception("skip of task %s not saved: the store failed", current)
                return [_note(NOT_SKIPPED, "⚠️", error=True), *unchanged]
            return moved_on(sess, _note("Skipped.") if current else "")

        # do_submit's trigger_mode ("once") ignores clicks while a submit is pending; disabling the button
        # first makes that visible. The submit names its task, so a replayed request is "already saved".
        # The page itself disables Submit and enables it again, with no call to the server, which refuses
        # every call once the session has ended (a refused first step stopped the chain before the submit
        # was sent); and enables it after a failed submit too (Gradio 6's page runs .then only after a
        # success): Submit is never left disabled, so this page can submit after a sign-in elsewhere.
        # show_progress="hidden" on submit and skip: on a call the server refused (session ended, another account,
        # store down) Gradio drew an "Error" box over each of its outputs, every response, rank and box of the
        # task, hiding the ranks the page keeps for the retry; the page's own bar says what happened.
        # Skip the same way, and each turns both off: a skip on its way gave no sign (show_progress hidden) and a
        # second click, or Submit, acted on the task after it unseen.
        off = "() => [{__type__: 'update', interactive: false}, {__type__: 'update', interactive: false}]"  # two buttons
        enable = ("(current) => [{__type__: 'update', interactive: !!current}, "
                  "{__type__: 'update', interactive: true}]")
        submit_inputs = [task_id, opened_by, order_tag, shown_at, *ranks, pairwise, all_bad, *unsafes, rationale,
                         page_touched, page_stamp]
        submitting = submit.click(None, None, [submit, skip], js=off).then(
            do_submit, submit_inputs, [message, *task_outputs], js=stamped(len(submit_inputs), touched=True),
            show_progress="hidden")
        skipping = skip.click(None, None, [submit, skip], js=off).then(
            do_skip, [task_id, opened_by], [message, *task_outputs], show_progress="hidden")
        for chain in (submitting, skipping):
            chain.then(None, task_id, [submit, skip], js=enable)
            chain.failure(None, task_id, [submit, skip], js=enable)

        def do_refresh(request: gr.Request):
            try:
                stats = handlers.admin_stats(store, signed_in(request), overlap=overlap,
                                             flagged=handlers.export_flagged(export_dir))
            except (PermissionError, handlers.AuthError) as err:
                return [_note(str(err), "⛔", error=True), "", "", None, None, ""]
            except StoreError as err:  # a row the app never wrote, named with what to do about it
                return [_note(str(err), "⚠️", error=True), *[gr.skip()] * 5]
            except STORE_ERRORS:
                log.exception("admin tab: the store failed")
                return [_note("The store is busy or unreachable: refresh again in a moment.", "⚠️", error=True),
                        *[gr.skip()] * 5]
            return ["", _totals(stats), _reliability_warnings(stats.get("warnings")), _table(stats.get("per_annotator")),
                    _table(stats.get("per_batch")), _agreement(stats.get("agreement") or {})]

        def do_export(request: gr.Request):
            if export is None:
                return _note("Export with align export.")
            try:
                with exporting:
                    summary = handlers.export(signed_in(request), export)
            except (PermissionError, handlers.AuthError) as err:
                return _note(str(err), "⛔", error=True)
            except (ValueError, StoreError) as err:  # the recipe's refusals (not an export folder, no pairs, a row
                return _note(str(err), "⚠️", error=True)  # the app never wrote), worded for people
            except STORE_ERRORS:  # the session's check, or the export process could not start
                log.exception("admin export failed")
                return _note("The export could not run (the store busy or unreachable, or the export process "
                             "failed to start; the app's log says which): try again in a moment.", "⚠️", error=True)
            return _export_summary(folder, summary)

        admin_outputs = [admin_message, totals, reliability_warnings, per_annotator, per_batch, agreement]
        # show_progress="hidden", as for Submit: a refused refresh drew "Error" over every table and figure. The
        # button is off while the figures are read: the sign the overlay gave that a refresh is on its way.
        refresh_off = "() => ({__type__: 'update', interactive: false})"
        refresh_on = "() => ({__type__: 'update', interactive: true})"
        # Selecting the tab refreshes too, with the same sign (it showed none: the tables sat stale until it ended).
        for trigger in (refresh.click, admin_tab.select):
            refreshing = trigger(None, None, refresh, js=refresh_off).then(do_refresh, None, admin_outputs,
                                                                           show_progress="hidden")
            refreshing.then(None, None, refresh, js=refresh_on)
            refreshing.failure(None, None, refresh, js=refresh_on)
        export_button.click(do_export, None, export_summary)

        if playground is not None:
            def pg_closed(sess: dict) -> str | None:
                """Why `sess` may not use the Playground now (handlers.playground_open), or None. Checked on every
                call: the tab is only hidden, and an A/B eval may have started since the page was loaded."""
                try:
                    if handlers.playground_open(store, sess, overlap=overlap):
                        return None
                except STORE_ERRORS:
                    log.exception("playground: the store failed")
                    return _note("The store is busy or unreachable: send again in a moment.", "⚠️", error=True)
                return _note(handlers.PLAYGROUND_CLOSED, "⛔", error=True)

            def pg_models(request: gr.Request, left: str | None, right: str | None):
                """The dropdowns filled from the server's /models; a choice already made is kept."""
                sess = signed_in(request)
                if sess is None:
                    return [gr.skip(), gr.skip(), signed_out]
                if closed := pg_closed(sess):
                    return [gr.update(choices=[], value=None), gr.update(choices=[], value=None), closed]
                try:
                    names = playground.models()
                except PlaygroundError as err:
                    return [gr.update(choices=[], value=None), gr.update(choices=[], value=None),
                            _note(str(err), "⚠️", error=True)]
                adapters = [n for n in names if n != "base"] or names
                left = left if left in names else (adapters[0] if adapters else None)
                right = right if right in names else next((n for n in adapters if n != left), left)
                return [gr.update(choices=names, value=left), gr.update(choices=names, value=right),
                        "" if names else _note("the server serves no model", "⚠️", error=True)]

            playground_tab.select(pg_models, [pg_left, pg_right], [pg_left, pg_right, pg_status])

            def pg_ask(request: gr.Request, left, right, message, temperature, histories):
                sess = signed_in(request)
                if sess is None:
                    yield [gr.skip(), gr.skip(), gr.skip(), signed_out, gr.skip()]
                    return
                if closed := pg_closed(sess):
                    yield [gr.skip(), gr.skip(), gr.skip(), closed, gr.skip()]
                    return
                try:
                    now = histories
                    for *now, left_html, right_html in playground_send(playground, (left, right), message, histories,
                                                                       temperature=float(temperature)):
                        yield [tuple(now), left_html, right_html, "", gr.skip()]
                    # The message box is emptied once a conversation holds the message: when both sides
                    # failed, it is still there to send again.
                    if any(len(h) > len(old) for h, old in zip(now, histories, strict=True)):
                        yield [gr.skip(), gr.skip(), gr.skip(), gr.skip(), ""]
                except ValueError as err:
                    yield [gr.skip(), gr.skip(), gr.skip(), _note(str(err), "⚠️", error=True), gr.skip()]

            # Send and Clear are off while both answers stream; at most 4 such streams run at once for the whole
            # app. Clear too: the running send writes the conversations and panes until it ends, so a Clear
            # in between would be undone and the next send would carry the turns it discarded. As for Submit,
            # the page itself turns them off and on again, after a failed send too: a server call for that is
            # refused once the session has ended, and stops the chain before the send.
            buttons = [pg_send, pg_clear]
            on = "() => [{__type__: 'update', interactive: true}, {__type__: 'update', interactive: true}]"
            # show_progress="hidden" as for Submit: a refused send drew "Error" over both panes and the message.
            # The answers streaming into the panes show the progress.
            sending = pg_send.click(None, None, buttons, js=off).then(
                pg_ask, [pg_left, pg_right, pg_message, pg_temperature, pg_histories],
                [pg_histories, *pg_panes, pg_status, pg_message], concurrency_limit=4, show_progress="hidden")
            sending.then(None, None, buttons, js=on)
            sending.failure(None, None, buttons, js=on)
            pg_clear.click(lambda: [([], []), conversation_html([]), conversation_html([]), ""], None,
                           [pg_histories, *pg_panes, pg_status])

        demo.load(None, None, None, js=_js())
    return demo
