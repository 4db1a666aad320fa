"""Reports over `mcq validate` results: report.md, a self-contained report.html with plots, and the combined
results.json. Only the CLI imports this package."""

from mcq.reports.report import ReportResult, write_report

__all__ = ["ReportResult", "write_report"]
