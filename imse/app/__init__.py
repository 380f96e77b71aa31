"""The app: Gradio glue, Plotly figures, the Teach tab, a public server's limits.

Only this layer imports UI libraries."""
