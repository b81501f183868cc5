"""``python -m nitsum_loadgen``: same as ``nitsum bench`` (kept for the service layout)."""

from nitsum_cli.main import main

if __name__ == "__main__":
    main(["bench", *__import__("sys").argv[1:]])
