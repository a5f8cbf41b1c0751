"""`sagan-ablate`'s studies and scales (studies), the runner that trains and evaluates them (runner), and the report
it writes (report)."""
