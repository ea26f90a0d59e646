"""``python -m lightning_diloco fit --config configs/tiny.yaml``."""

from lightning_diloco.cli import main

if __name__ == "__main__":
    main()
