import logging
import os
import sys

from trainer.cli import main

code = main(own_process=True)
# One rank of several leaves without the process group's C++ teardown. The run is over (its
# last collective, a barrier, is behind it, and its events are closed), but gloo's and FSDP's
# destructors at interpreter exit abort a rank now and then ("terminate called without an active
# exception") on a loaded machine, and the launcher then reports a finished job as failed.
dist = sys.modules.get("torch.distributed")
if dist is not None and dist.is_available() and dist.is_initialized():
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
