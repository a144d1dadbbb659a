"""Widgets and page scaffolding shared by the pages.

Streamlit forgets a widget's value when the user switches pages, so every choice that should
survive (the store, the run, the image, the layer, the token) is mirrored in a non-widget
``session_state`` key (``probe.keep.<key>``) and restored from it (`sticky`). A run id from the
URL (``?run=ID``) is checked by the store before anything is read; a bad one is reported and ignored.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from typing import Any

import streamlit as st

from probeapp import data
from probeapp.data import RunUnreadable, RunView

KEEP = "probe.keep."


def sticky(widget: Callable[..., Any], label: str, options: Sequence[Any], key: str, **kw: Any) -> Any:
    """`widget(label, options, key=key, **kw)` whose value survives page switches and reruns in
    which it is not drawn: kept in ``probe.keep.<key>`` and restored when the widget is new."""
    options = list(options)
    if not options:
        return None
    keep = KEEP + key
    if key not in st.session_state or st.session_state[key] not in options:
        want = st.session_state.get(keep)
        st.session_state[key] = want if want in options else options[0]
    value = widget(label, options, key=key, **kw)
    st.session_state[keep] = value
    return value


def keep(key: str, value: Any) -> None:
    """Choose `value` for the sticky widget `key` (from a link, a click on a chart, the URL)."""
    st.session_state[KEEP + key] = value
    st.session_state[key] = value


def kept(key: str, default: Any = None) -> Any:
    return st.session_state.get(KEEP + key, default)


def guard(page: Callable[[], None]) -> Callable[[], None]:
    """Run a page body so that a run that cannot be read, or holds what the page does not expect,
    shows an error naming the problem instead of a traceback."""

    @functools.wraps(page)
    def run() -> None:
        try:
            page()
        except RunUnreadable as e:
            st.error(f"This run cannot be shown: {e}")
        except Exception as e:  # a corrupt or unexpected run must not take the page down
            st.error(f"This run cannot be shown: it does not hold what this page expects "
                     f"({type(e).__name__}: {' '.join(str(e).split())[:400]}). Open it on the "
                     "**Any run** page to see its files, or delete it on the **Runs** page.")

    return run


def page_path(analysis: str) -> str:
    return data.PAGE_OF.get(analysis, data.GENERIC_PAGE)


def url_run() -> str | None:
    """The ``?run=`` of the URL (not yet checked)."""
    v = st.query_params.get("run")
    return str(v) if v else None


def url_arrived(url_key: str) -> str | None:
    """The ``?run=`` of the URL when it is new to the view `url_key` (an address the user arrived
    with, or a link followed), else None: the view has already followed it, or wrote it itself.
    An address is followed once; afterwards the view's own choice wins and is written back."""
    asked = url_run()
    seen = "probe.url." + url_key
    if not asked or asked == st.session_state.get(seen):
        return None
    st.session_state[seen] = asked
    return asked


def url_follows(url_key: str, run_id: str) -> None:
    """Keep ``?run=`` in step with the run a view shows (so a view can be shared)."""
    st.session_state["probe.url." + url_key] = run_id
    if st.query_params.get("run") != run_id:
        st.query_params["run"] = run_id


def article(word: str) -> str:
    """The indefinite article for `word`: "an" (attention) or "a" (flow)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def pick_run(analyses: Sequence[str] | None, key: str, label: str = "Run",
             accept: Callable[[dict[str, Any]], bool] | None = None, url_key: str | None = None) -> RunView | None:
    """A run of the given analyses (None: any), chosen in a select box that remembers its choice
    and follows ``?run=ID`` when the page is opened with it; returns the opened run, or None (with
    a message) when there is none. The address is then kept in step with the choice.

    A run id from the URL goes through the store's checks first; a bad id or a run of another
    analysis is reported and the URL parameter is dropped. `url_key` names the view for the
    address (default `key`; Compare keeps one for all its analyses).

    Raises:
        RunUnreadable: the chosen run is broken (`guard` shows it).
    """
    rows = data.listing()
    mine = [r for r in rows if (analyses is None or r["analysis"] in analyses or (accept and accept(r)))]
    ids = [r["id"] for r in mine]
    url_key = url_key or key
    asked = url_arrived(url_key)
    if asked:
        try:
            v = data.open_run(asked)
        except RunUnreadable as e:
            st.error(f"The run in the address (`?run=`) was not opened: {e}")
            del st.query_params["run"]
        else:
            a = v.manifest.get("analysis", "?")
            if asked in ids:
                keep(key, asked)
            else:
                st.info(f"Run `{asked}` is {article(str(a))} **{a}** run; this page shows "
                        f"{', '.join(analyses or ['any'])} runs.")
                st.page_link(page_path(str(a)), label=f"Open {asked} on its page", query_params={"run": asked})
    if not mine:
        what = ", ".join(analyses or ["any"])
        st.info(f"No {what} runs in `{data.safe_text(data.store_root())}`. Make one with "
                f"`probe run {(analyses or ['attention'])[0]}`, or choose another store in the sidebar.")
        return None
    by_id = {r["id"]: r for r in mine}

    def fmt(i: str) -> str:
        r = by_id[i]
        flag = "  [BROKEN]" if r["status"] != "ok" else ""
        return f"{r['created'][:16].replace('T', ' ')} · {r['analysis']} · {r['model']} · {i}{flag}"

    choice = sticky(st.selectbox, label, ids, key, format_func=fmt)
    url_follows(url_key, choice)
    return data.open_run(choice)


def run_header(v: RunView) -> None:
    """The run's identity in one line (analysis, model, weights and hash, created), and the warnings
    every page shows."""
    source, sha = v.weights()
    created = str(v.manifest.get("created", ""))[:19].replace("T", " ")
    st.markdown(f":violet-badge[{v.kind}] **{v.model}** · weights `{source}`"
                + (f" (sha256 `{sha}`)" if sha else "") + f" · created {created} · `{v.id}`")
    if "random" in source.split(","):
        st.warning("This run used random weights: it shows the architecture, not learned behaviour.")


def approximate_marker(v: RunView) -> None:
    if v.approximate():
        st.warning(f"**Effective attention** ({v.model}, attention kind `{v.attention_kind()}`): this kind never forms "
                   "softmax(QK^T); the maps are the token-by-token matrix its adapter derives (e.g. "
                   "D^-1 phi(Q) phi(K)^T for Performer), approximate by construction.", icon=":material/approval:")


def image_picker(v: RunView, key: str, names: Sequence[str] | None = None) -> int:
    names = list(names if names is not None else v.field("image_names", []) or [])
    n = len(names)
    if n == 0:
        shape = v.shape("input.image")
        n = shape[0] if shape else 1
        names = [f"image {i}" for i in range(n)]
    if n == 1:
        st.caption(f"image: {names[0]}")
        return 0
    return int(sticky(st.selectbox, "Image", list(range(n)), key, format_func=lambda i: f"{i}: {names[i]}"))


def token_picker(tokens: Sequence[str], key: str, label: str = "Caption token (click one)") -> int:
    """The caption as clickable tokens; returns the chosen step."""
    tokens = list(tokens)
    if not tokens:
        return 0
    # Repeated tokens ("a" twice) get labels made unique by zero-width spaces: they look the same, and
    # the browser cannot confuse the second "a" with the first when it reports or shows the choice.
    labels, seen = [], {}
    for t in tokens:
        base = t if t.strip() else repr(t)
        labels.append(base + "\u200b" * seen.get(base, 0))
        seen[base] = seen.get(base, 0) + 1
    return int(sticky(st.pills, label, list(range(len(tokens))), key, format_func=lambda i: labels[i],
                      selection_mode="single", required=True))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def figures(v: RunView, limit: int | None = None) -> None:
    """The figures the run saved (PNG), as they are; one that cannot be read or is not a PNG is
    named with its problem, and the others are still shown."""
    names = v.figures[:limit] if limit else v.figures
    if not names:
        st.caption("This run saved no figures.")
    for name in names:
        try:
            png = v.figure(name)
            if not png.startswith(PNG_SIGNATURE):
                raise ValueError("not a PNG file")
            st.image(png, caption=name)
        except Exception as e:  # one odd file must not hide the rest of the page
            st.warning(f"figure `{name}` cannot be shown: {type(e).__name__}: {' '.join(str(e).split())[:200]}")


def manifest_view(v: RunView) -> None:
    m = v.manifest
    env = m.get("environment") if isinstance(m.get("environment"), dict) else {}
    source, sha = v.weights()
    st.markdown(
        f"**versions**: probe {env.get('probe', '?')}, torch {env.get('torch', '?')}, "
        f"transformers {env.get('transformers', '?')}, python {env.get('python', '?')}  \n"
        f"**weights**: {source} (sha256 `{sha or '?'}`), requested `{m.get('weights_requested', '?')}`  \n"
        f"**attention implementation**: {m.get('attn_implementation', '?')}  \n"
        f"**device / dtype / seed**: {m.get('device', '?')} / {m.get('dtype', '?')} / {m.get('seed', '?')}")
    c1, c2 = st.columns(2)
    with c1:
        st.caption("parameters")
        st.json(m.get("parameters", {}), expanded=True)
    with c2:
        st.caption("timings (s)")
        st.json(m.get("timings_s", {}), expanded=True)
    with st.expander("Full manifest"):
        st.code(json.dumps(m, indent=2), language="json")


def open_link(v: RunView | dict[str, Any], label: str | None = None) -> None:
    rid = v.id if isinstance(v, RunView) else v["id"]
    analysis = v.kind if isinstance(v, RunView) else v["analysis"]
    st.page_link(page_path(analysis), label=label or f"Open {rid}", query_params={"run": rid},
                 icon=":material/open_in_new:")
