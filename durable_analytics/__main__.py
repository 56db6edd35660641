"""``python -m durable_analytics``: the command line (see cli/)."""

from durable_analytics.cli import main

if __name__ == "__main__":
    main()
