"""Streamlit app over a probe run store: browse, inspect and compare saved runs.

    streamlit run app/main.py             # store from $PROBE_STORE or ./probe-runs (or chosen in the sidebar)

It reads saved runs only (manifest, result JSON, array slices, figures) and never loads a model or
installs a hook, so it is fast and safe to point at a shared store. The server binds to
127.0.0.1 (``.streamlit/config.toml``); ``--server.address 0.0.0.0`` exposes it. Set
``PROBE_APP_READONLY=1`` to hide the delete button and the store chooser.
"""

from __future__ import annotations

import streamlit as st
from probeapp import data

st.set_page_config(page_title="probe", page_icon=":material/visibility:", layout="wide")

# The store: chosen once in the sidebar (every page reads it), kept in a non-widget key.
with st.sidebar:
    if data.readonly():
        st.caption(f"Run store (read-only): `{data.store_root()}`")
    else:
        if data.STORE_KEY not in st.session_state:
            st.session_state[data.STORE_KEY] = data.default_root_text()
        if "store_input" not in st.session_state:
            st.session_state["store_input"] = st.session_state[data.STORE_KEY]
        chosen = st.text_input("Run store folder", key="store_input",
                               help="$PROBE_STORE, else ./probe-runs; any folder of runs written by probe")
        if chosen.strip() != st.session_state[data.STORE_KEY]:
            st.session_state[data.STORE_KEY] = chosen.strip() or data.default_root_text()
    root = data.store_root()
    if root.exists() and not root.is_dir():
        st.error(f"`{root}` is a file, not a run store folder.")
    elif root.is_dir():
        n = len(data.listing())
        st.caption(f"{n} run{'s' if n != 1 else ''} in `{root}`")
    else:
        st.caption(f"`{root}` does not exist yet.")
    if st.button("Reload the store", icon=":material/refresh:", help="read the store's folder again"):
        data.clear_caches()

pages = {
    "Store": [
        st.Page("app_pages/runs.py", title="Runs", icon=":material/table_rows:", default=True),
        st.Page("app_pages/compare.py", title="Compare", icon=":material/compare:", url_path="compare"),
        st.Page("app_pages/generic.py", title="Any run", icon=":material/data_object:", url_path="any-run"),
    ],
    "Analyses": [
        st.Page("app_pages/attention.py", title="Attention", icon=":material/grid_on:", url_path="attention"),
        st.Page("app_pages/flow.py", title="Flow and tokens", icon=":material/short_text:", url_path="flow"),
        st.Page("app_pages/ablation.py", title="Ablation", icon=":material/content_cut:", url_path="ablation"),
        st.Page("app_pages/attribution.py", title="Attribution", icon=":material/highlight:", url_path="attribution"),
        st.Page("app_pages/faithfulness.py", title="Faithfulness", icon=":material/fact_check:",
                url_path="faithfulness"),
        st.Page("app_pages/patching.py", title="Patching", icon=":material/swap_horiz:", url_path="patching"),
        st.Page("app_pages/cross_attention.py", title="Cross-attention and fusion", icon=":material/hub:",
                url_path="cross-attention"),
    ],
}
st.navigation(pages).run()
