"""`ftplan report`: comparison charts (PNG), their data (CSV) and a page that puts them together (HTML, Markdown).

- `data`: one function per chart that calls the planner and returns the pandas DataFrame the chart draws;
- `charts`: matplotlib drawings of those frames (no pyplot, no global state);
- `html`: `index.html` and `report.md` with relative links to the PNGs and CSVs (opens offline).

pandas and matplotlib are imported by those modules only, never by this package's `__init__` or by
`ftplan estimate` / `ftplan recommend` (install them with the `report` extra).
"""

__all__ = ["data", "charts", "html"]
