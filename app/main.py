"""Streamlit app over a probe run store: browse, inspect and compare saved runs.

    streamlit run app/main.py             # store from $PROBE_STORE or ./probe-runs (or chosen in the sidebar)

It reads saved runs only (manifest, result JSON, array slices, figures) and never loads a model or
installs a hook, so it is fast and safe to point at a shared store. The server binds to
127.0.0.1 through ``.streamlit/config.toml``, which Streamlit reads from the folder it is started
in: started elsewhere without ``--server.address``, it listens on every interface, and every page
says so. ``--server.address 0.0.0.0`` exposes it on purpose. Set ``PROBE_APP_READONLY=1`` to hide
the delete button and the store chooser.
"""

from __future__ import annotations

import streamlit as st
from probeapp import data

st.set_page_config(page_title="probe", page_icon=":material/visibility:", layout="wide")

# Streamlit reads .streamlit/config.toml (server.address = 127.0.0.1) from the folder it was started
# in only; started elsewhere, no address is set and the server listens on every interface.
if not (st.get_option("server.address") or "").strip():
    st.warning("**This server listens on every network interface**: no `server.address` is set, because "
               "Streamlit reads `.streamlit/config.toml` only from the folder it is started in. Stop it and "
               "start it again with `--server.address 127.0.0.1` (or from the repository root) to keep it on "
               "this machine; pass `--server.address 0.0.0.0` to serve other machines on purpose.",
               icon=":material/public:")

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
    shown_root = data.safe_text(root)
    if root.exists() and not root.is_dir():
        st.error(f"`{shown_root}` is a file, not a run store folder.")
    elif root.is_dir():
        n = len(data.listing())
        if n:
            st.caption(f"{n} run{'s' if n != 1 else ''} in `{shown_root}`")
        else:
            st.caption(f"`{shown_root}` holds no probe runs" + (" (nothing in it was written by `probe run`)"
                                                                 if data.has_entries(root) else " yet") + ".")
    else:
        st.caption(f"`{shown_root}` does not exist yet.")
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
        st.Page("app_pages/probes.py", title="Probes", icon=":material/query_stats:", url_path="probes"),
        st.Page("app_pages/umap.py", title="UMAP and modality gap", icon=":material/scatter_plot:", url_path="umap"),
        st.Page("app_pages/logit_lens.py", title="Logit lens", icon=":material/translate:", url_path="logit-lens"),
        st.Page("app_pages/efficiency.py", title="Efficiency", icon=":material/speed:", url_path="efficiency"),
    ],
}
st.navigation(pages, expanded=True).run()  # every page listed (not "View 3 more")
