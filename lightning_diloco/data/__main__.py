"""``python -m lightning_diloco.data configs/c4_150m.yaml``: build a config's token cache (see :func:`prepare_main`)."""

from lightning_diloco.data.prepare import prepare_main

if __name__ == "__main__":
    prepare_main()
