"""One script per finding. Each composes the mechun library and writes ``results.json`` + ``report.html``."""
