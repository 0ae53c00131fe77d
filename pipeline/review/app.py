"""`masklet review OUT`: the Streamlit review app (the project's only Streamlit import).

Run by `masklet review` as `streamlit run app.py -- --out OUT --reviewer NAME` (or, for tests, with
MASKLET_REVIEW_OUT / MASKLET_REVIEW_REVIEWER in the environment). Streamlit reruns this script on every
click; what must survive a rerun lives in st.session_state (the reviewer's ReviewSession, the clicks on the
current frame, SAM 2's last answer), what is shared between sessions and costly lives in st.cache_resource
(the opened run, the frame predictor) and st.cache_data (the queue, decoded frames).

Layout: sidebar (run, reviewer, progress, filters, monitoring); main: queue, then the selected masklet's
item: frame with every masklet overlaid (click to prompt SAM 2), timeline, candidates, decisions, signals.
Each part only lays out what pipeline/review/view.py, predict.py, monitor.py and store.py compute.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import streamlit as st

from pipeline.review import monitor as monitor_mod
from pipeline.review import store, view

DISPLAY_WIDTH = 640  # the click image's displayed width (fixed, so clicks convert the same on any window)
QUEUE_SHOWN = 200
MODES = ("positive point", "negative point", "box (drag)")
NEW_MASKLET = -1
KEYS = view.KEYS


def _args() -> tuple[str, str]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--reviewer")
    ns, _ = parser.parse_known_args(sys.argv[1:]) if "--out" in sys.argv else (argparse.Namespace(), None)
    out = getattr(ns, "out", None) or os.environ.get("MASKLET_REVIEW_OUT")
    reviewer = getattr(ns, "reviewer", None) or os.environ.get("MASKLET_REVIEW_REVIEWER") or os.environ.get(
        "USER", "reviewer")
    if not out:
        st.error("no run folder: start the app with `masklet review OUT`")
        st.stop()
    return out, reviewer


@st.cache_resource(show_spinner=False)
def _run(out: str):
    from pipeline import open_run

    return open_run(out)


@st.cache_data(show_spinner="reading the queue", max_entries=4)
def _queue(out: str):
    return view.queue_table(_run(out))


@st.cache_resource(show_spinner="loading the run's SAM 2 model")
def _predictor(out: str):
    from pipeline.review.predict import FramePredictor

    return FramePredictor(_run(out).plan.config.model)


@st.cache_data(show_spinner=False, max_entries=16)
def _item_tables(out: str, item_id: str):
    """The item's masklet rows as they are now (each masklet's newest version, new masklets included:
    pipeline/review/versions.item_masklets) and the frames where each is visible."""
    from pipeline.review import versions

    run = _run(out)
    table = versions.item_masklets(out, item_id, run.masklets_for(item_id))
    newest = {r["object_id"]: r["version"] for r in table.select(["object_id", "version"]).to_pylist()
              if r["version"]}
    frames = run.frames_for(item_id).select(["object_id", "frame", "area"])
    parts = [frames.filter(pc.invert(pc.is_in(frames["object_id"], value_set=pa.array(list(newest), pa.int32()))))]
    parts += [versions.version_frames(out, item_id, o, v).select(frames.column_names) for o, v in newest.items()]
    frames = pa.concat_tables(parts)
    frames = frames.filter(pc.greater(frames["area"], 0))
    visible: dict[int, set[int]] = {}
    for obj, t in zip(frames["object_id"].to_pylist(), frames["frame"].to_pylist()):
        visible.setdefault(obj, set()).add(t)
    return table.to_pylist(), visible


@st.cache_data(show_spinner=False, max_entries=64)
def _frame(out: str, item_id: str, t: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(rgb of decoded frame t, {object_id: bool (H, W) mask at t} of each masklet at its newest version, new
    masklets included); grey when the media cannot be decoded."""
    from pipeline.report.gallery import _decode
    from pipeline.review import versions

    run = _run(out)
    array = run.masks(item_id)
    masks = dict(enumerate(np.asarray(array[:, t])))
    for obj in versions.versioned_objects(out, item_id):  # a refined or new masklet shows its newest version
        masks[obj] = np.asarray(run.masklet_masks(item_id, obj)[t])
    try:
        rgb = _decode(run, item_id, [t]).get(t)
    except Exception as e:  # noqa: BLE001  the media moved or broke since the run: review the masks on grey
        st.warning(f"frame {t} of {item_id} could not be decoded ({type(e).__name__}: {e}); masks on grey")
        rgb = None
    if rgb is None:
        rgb = np.full((*array.shape[2:], 3), 128, dtype=np.uint8)
    return rgb, masks


def _session(out: str, reviewer: str) -> store.ReviewSession:
    if "review_session" not in st.session_state:
        st.session_state.review_session = store.ReviewSession(out, reviewer)
    return st.session_state.review_session


def _refine_available() -> bool:
    try:
        from pipeline.review.refine import refine_masklet  # noqa: F401
    except ImportError:
        return False
    return True


def _sidebar(out: str, reviewer: str, queue, latest: dict) -> dict:
    sb = st.sidebar
    sb.markdown(f"**Run** `{out}`  \n**Reviewer** {reviewer}")
    decided = sum(1 for row in latest.values() if row["decision"])
    total = len(queue)
    sb.progress(decided / total if total else 1.0, text=f"{decided:,} decided / {total - decided:,} to do")
    sb.subheader("Filters")
    all_flags = sorted(set(pc.list_flatten(queue["flags"]).unique().to_pylist()) - {None})
    filters = {
        "flags": sb.multiselect("flags (any of)", all_flags, key="f_flags"),
        "decision": sb.selectbox("decision", view.DECISION_FILTERS, key="f_decision",
                                 format_func=lambda d: d or "all",
                                 help="'not rejected' leaves out rejected and duplicate masklets"),
        "item": sb.text_input("item id contains", key="f_item"),
        "todo_first": sb.toggle("to do first", True, key="f_todo_first",
                                help="masklets with no decision yet before the decided ones"),
    }
    sb.subheader("Monitoring")
    m = monitor_mod.monitor(store.events(out))
    for lat in m.latency:
        if lat.count:
            sb.caption(f"{lat.kind}: p50 {lat.p50:.0f} ms, p95 {lat.p95:.0f} ms, p99 {lat.p99:.0f} ms "
                       f"({lat.count})")
        else:
            sb.caption(f"{lat.kind}: none yet")
    sb.caption(f"corrections {m.corrections}; clicks median {m.clicks_median if m.clicks_median is not None else '-'}"
               f", BG share median {'-' if m.bg_share_median is None else f'{m.bg_share_median:.0%}'}")
    sb.caption(f"retries {m.retries} ({'-' if m.retry_rate is None else f'{m.retry_rate:.0%}'}); abandons "
               f"{m.abandons} of {m.visits} visits ({'-' if m.abandon_rate is None else f'{m.abandon_rate:.0%}'})")
    for alert in m.alerts:
        sb.warning(alert)
    return filters


def _open_item(session, item_id: str) -> None:
    """An `open_item` event when the reviewer moves to another item (the monitor's visits and abandons)."""
    if st.session_state.get("open_item") != item_id:
        session.event("open_item", item_id)
        st.session_state.open_item = item_id
        st.session_state.clicks = []
        st.session_state.answer = None


def main() -> None:
    st.set_page_config(page_title="masklet review", layout="wide")
    out, reviewer = _args()
    run = _run(out)
    if run.random_weights:
        st.error("RANDOM WEIGHTS: these masks come from a random-weight model (plumbing only, not real masks); "
                 "do not review them as results.", icon="⚠️")
    session = _session(out, reviewer)
    queue = _queue(out)
    latest = view.latest_decisions(store.decisions(out))
    filters = _sidebar(out, reviewer, queue, latest)
    shown = view.filter_queue(queue, latest, filters["flags"], filters["decision"] or None, filters["item"])
    shown = shown.append_column("rank", pa.array(np.arange(len(shown), dtype=np.int64)))
    if filters["todo_first"]:
        shown = view.todo_first(shown, latest)

    st.subheader(f"Queue: {len(shown):,} masklets ({'to do first, then ' if filters['todo_first'] else ''}"
                 f"highest review priority first; a refined masklet ranks by its newest version)")
    top = shown.slice(0, QUEUE_SHOWN).to_pylist()
    if not top:
        st.info("no masklet matches the filters")
        return
    st.dataframe([{"masklet": r["masklet_id"], "priority": r["review_priority"], "version": r["version"],
                   "flags": ", ".join(r["flags"] or []),
                   "decision": (latest.get(r["masklet_id"]) or {}).get("decision") or "",
                   "label": (latest.get(r["masklet_id"]) or {}).get("label") or ""} for r in top],
                 height=220, width="stretch")
    ids = [r["masklet_id"] for r in top]
    picked = st.selectbox("review masklet", ids, key="masklet_pick")
    _next_buttons([r["masklet_id"] for r in sorted(top, key=lambda r: r["rank"])], picked,
                  {m for m, r in latest.items() if r["decision"]} if filters["todo_first"] else set())
    row = top[ids.index(picked)]
    _item(out, session, row["item_id"], int(row["object_id"]), latest)


def _go(target: str | None) -> None:
    """on_click of the next buttons: runs before the rerun, so the selectbox is not drawn yet and its value
    may be set."""
    if target is not None:
        st.session_state.masklet_pick = target


def _next_buttons(ranked: list[str], current: str, decided: set[str]) -> None:
    """Next masklet / next item, in review-priority order, past the decided ones when to-do comes first."""
    c1, c2, _ = st.columns([1, 1, 4])
    c1.button("Next masklet", key="next_masklet", shortcut=KEYS["next_masklet"], on_click=_go,
              args=(view.next_masklet(ranked, current, decided),), help="the next masklet to review")
    c2.button("Next item", key="next_item", shortcut=KEYS["next_item"], on_click=_go,
              args=(view.next_item(ranked, current, decided),), help="the first masklet of the next item")


def _item(out: str, session, item_id: str, object_id: int, latest: dict) -> None:
    _open_item(session, item_id)
    masklets, visible = _item_tables(out, item_id)
    objects = [r["object_id"] for r in masklets]
    try:
        num_frames = int(_run(out).masks(item_id).shape[1])
    except (KeyError, FileNotFoundError) as e:  # not committed as done, or its array was removed since
        st.warning(f"{item_id}: no masks to show ({e})")
        _decisions(session, item_id, object_id, objects, latest)
        return
    st.subheader(f"Item {item_id}: {len(objects)} masklets, {num_frames} frames")

    left, right = st.columns([3, 2])
    with right:
        t = st.slider("frame", 0, max(0, num_frames - 1), 0, key="frame") if num_frames > 1 else 0
        fill = st.toggle("fill", True, key="fill")
        outline = st.toggle("outline", True, key="outline")
        opacity = st.slider("opacity", 0.0, 1.0, 0.45, 0.05, key="opacity")
        shown_objects = st.multiselect("masklets shown", objects, default=objects, key=f"shown_{item_id}")
        target_options = objects + [NEW_MASKLET]
        target = st.selectbox("correct masklet", target_options,
                              index=target_options.index(object_id) if object_id in target_options else 0,
                              format_func=lambda o: "new masklet" if o == NEW_MASKLET else f"{item_id}/{o}",
                              key="target")
        mode = st.radio("click adds", MODES, horizontal=True, key="mode")
    rgb, masks = _frame(out, item_id, t)
    _h, w = rgb.shape[:2]
    key = (item_id, target, t)
    if st.session_state.get("click_key") != key:  # clicks belong to one masklet on one frame
        st.session_state.click_key, st.session_state.clicks = key, []
        st.session_state.box, st.session_state.answer = None, None
    clicks: list = st.session_state.clicks
    answer = st.session_state.get("answer")
    choice = st.session_state.get("candidate_shown", 0)
    extra = None
    if answer is not None and answer.candidates:
        extra = answer.candidates[min(choice, len(answer.candidates) - 1)].mask
    img = view.overlay(rgb, {o: masks[o] for o in shown_objects if o in masks}, opacity=opacity, fill=fill,
                       outline=outline, highlight=target, points=clicks, box=st.session_state.get("box"),
                       extra=extra)
    with left:
        from streamlit_image_coordinates import streamlit_image_coordinates

        value = streamlit_image_coordinates(img, width=min(DISPLAY_WIDTH, w * 4), key="click",
                                            click_and_drag=mode == MODES[2], cursor="crosshair")
        st.caption("click: prompt SAM 2 on this frame (white: its answer); colours: one per masklet")
    _take_click(out, session, item_id, target, t, rgb, value, mode)

    with right:
        _candidates(out, session, item_id, target, t)
    _timeline(out, item_id, objects, num_frames, visible, t)
    _decisions(session, item_id, object_id, objects, latest)
    _signals(masklets, object_id)


def _take_click(out, session, item_id, target, t, rgb, value, mode) -> None:
    """A new click value from the image component: add the point (or box) in mask pixels and ask SAM 2."""
    if not value or value == st.session_state.get("last_click"):
        return
    st.session_state.last_click = value
    h, w = rgb.shape[:2]
    p = view.to_mask_pixels(value, w, h)
    if mode == MODES[2]:
        if "x1" not in p:
            return
        st.session_state.box = (min(p["x1"], p["x2"]), min(p["y1"], p["y2"]), max(p["x1"], p["x2"]),
                                max(p["y1"], p["y2"]))
    else:
        if "x" not in p:
            return
        st.session_state.clicks.append((p["x"], p["y"], 1 if mode == MODES[0] else 0))
    clicks, box = st.session_state.clicks, st.session_state.get("box")
    answer = _predictor(out).predict(item_id, t, rgb, [(x, y) for x, y, _ in clicks],
                                     [lab for _, _, lab in clicks], box)
    session.event("frame_prediction", item_id, None if target < 0 else target, t, ms=answer.ms)
    st.session_state.answer = answer
    st.session_state.candidate_shown = 0
    st.rerun()


def _candidates(out, session, item_id, target, t) -> None:
    answer = st.session_state.get("answer")
    clicks = st.session_state.clicks
    if answer is None:
        st.caption("no prompt on this frame yet: click on the frame")
        return
    st.markdown(f"**SAM 2's answer** ({answer.ms:.0f} ms; frame embedding {answer.embed_ms:.0f} ms)")
    labels = [f"#{c.index}: score {c.score:.3f}, area {c.area:,} px, perimeter {c.perimeter:.0f} px"
              for c in answer.candidates]
    shown = st.radio("candidate", range(len(labels)), format_func=lambda k: labels[k], key="candidate_shown")
    lock = st.checkbox("lock this frame (re-tracking never overwrites it)", key="lock")
    c1, c2 = st.columns(2)
    if c1.button("Use this candidate", key="use_candidate", type="primary"):
        cand = answer.candidates[shown]
        correction_id = session.correct(item_id, target, t, [(x, y) for x, y, _ in clicks],
                                        [lab for _, _, lab in clicks], box=st.session_state.get("box"),
                                        candidate=cand.index, lock=lock)
        fg = sum(1 for *_, lab in clicks if lab)
        session.event("correction", item_id, target, t, fg_clicks=fg, bg_clicks=len(clicks) - fg)
        st.session_state.last_correction = (correction_id, item_id, target)
        st.session_state.clicks, st.session_state.box, st.session_state.answer = [], None, None
        st.rerun()
    if c2.button("Clear clicks", key="clear_clicks"):
        st.session_state.clicks, st.session_state.box, st.session_state.answer = [], None, None
        st.rerun()


def _propagate(out, session) -> None:
    last = st.session_state.get("last_correction")
    if not last:
        return
    correction_id, item_id, target = last
    st.success(f"correction {correction_id[:8]} queued for {item_id}/{target if target >= 0 else 'new'}")
    if not _refine_available():
        st.caption("re-tracking waits for `masklet refine OUT` (refine is not installed in this build)")
        return
    if st.button("Propagate now", key="propagate",
                 help="re-track this masklet with SAM 2 now (a new masklet: track it from this frame forward)"):
        from pipeline.review.refine import refine_masklet, refine_new_masklets

        bar = st.progress(0.0, text="propagating")

        def progress(stage: str, done: int, total: int) -> None:
            bar.progress(min(1.0, done / total) if total else 0.0, text=f"{stage}: {done} / {total}")

        t0 = time.perf_counter()
        if target < 0:
            created = refine_new_masklets(out, item_id, progress=progress)
            result = 1 if created else None
            message = f"{item_id}: new masklet(s) {', '.join(map(str, created))} written (version 1)"
        else:
            result = refine_masklet(out, item_id, target, progress=progress)
            message = f"{item_id}/{target}: version {result} written"
        ms = (time.perf_counter() - t0) * 1000
        session.event("propagation", item_id, None if target < 0 else target, ms=ms)
        bar.progress(1.0, text=f"propagated in {ms / 1000:.1f} s")
        st.session_state.last_correction = None
        st.session_state.propagated = result
        st.success(message if result is not None else "nothing was pending for this masklet")
        for cached in (_run, _queue, _item_tables, _frame):  # the new version replaces the masks shown
            cached.clear()


def _timeline(out, item_id, objects, num_frames, visible, t) -> None:
    corr = store.corrections(out)
    corr = corr.filter(pc.equal(corr["item_id"], item_id)) if len(corr) else corr
    corrected: dict[int, set[int]] = {}
    for obj, frame in zip(corr["object_id"].to_pylist(), corr["frame"].to_pylist()):
        corrected.setdefault(obj, set()).add(frame)
    st.markdown("**Timeline** (rows: masklets in id order; coloured: visible; white bar: corrected)")
    cell = max(4, min(24, 900 // max(1, num_frames)))
    st.image(view.timeline(objects, num_frames, visible, corrected, t, cell=cell))
    _propagate(out, st.session_state.review_session)


def _decisions(session, item_id, object_id, objects, latest) -> None:
    mid = store.masklet_id(item_id, object_id)
    current = latest.get(mid) or {}
    st.markdown(f"**Decision on {mid}**: {current.get('decision') or 'none yet'}"
                f"{'; label ' + current['label'] if current.get('label') else ''}")
    cols = st.columns(5)

    def decide(decision, **kw):
        session.decide(item_id, object_id, decision, **kw)
        session.event("decision", item_id, object_id)
        st.rerun()

    if cols[0].button("Accept", key="accept", type="primary", shortcut=KEYS["accept"],
                      help=f"accept {mid} (key {KEYS['accept']})"):
        decide("accept")
    if cols[1].button("Reject", key="reject", shortcut=KEYS["reject"], help=f"reject {mid} (key {KEYS['reject']})"):
        decide("reject")
    others = [store.masklet_id(item_id, o) for o in objects if o != object_id]
    dup = cols[2].selectbox("duplicate of", others or ["-"], key="dup_of")
    if cols[3].button("Mark duplicate", key="duplicate", disabled=not others):
        decide("duplicate", duplicate_of=dup)
    label = cols[4].text_input("label", key="label_text")
    if cols[4].button("Save label", key="save_label", disabled=not label):
        decide("label", label=label)


def _signals(masklets, object_id) -> None:
    row = next((r for r in masklets if r["object_id"] == object_id), None)
    if row is None:
        return
    st.markdown(f"**Signals of {row['masklet_id']}**: flags {', '.join(row['flags'] or []) or 'none'}; "
                f"review priority {row['review_priority']:.3f}")
    st.dataframe([{"signal": k, "value": str(v)} for k, v in row.items()
                  if k not in ("item_id", "object_id", "masklet_id", "flags")], height=240)


main()
