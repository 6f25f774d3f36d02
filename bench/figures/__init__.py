"""One module per group of issue 7's figures; each measures, none reports."""
