import sys

from trainer.cli import main

sys.exit(main(own_process=True))
