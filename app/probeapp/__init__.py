"""Helpers of the probe Streamlit app: lazy, checked reads of the run store (`data`), pure figure
and chart builders (`render`), widgets whose choices survive page switches (`ui`), and one view per
result kind shared by the analysis pages and the Compare page (`views`).

The app reads the run store only; nothing here loads a model or installs a hook.
"""
