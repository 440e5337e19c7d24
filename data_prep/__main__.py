"""``python -m data_prep shard INPUTS... --out URL``."""

from data_prep.cli import app

app(prog_name="python -m data_prep")
