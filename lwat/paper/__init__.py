"""The paper, one module per table or figure: its published numbers (PAPER), the runs it needs at each scale
(plan) and how it renders our numbers beside the paper's (render). `lwat.presets` registers them by name;
`lwat.reproduce` runs their plans and writes the report.

plan.py holds what tables share (scales, data sources, the plan types, the paper's protocol per scale), results.py
what a table reads back, `lwat.render` the text helpers (mean ± std, markdown tables, claims).
"""
