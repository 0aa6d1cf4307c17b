"""Child process: the floor for start-up, a bare `import torch, transformers, datasets, accelerate`.

Writes {"seconds": from process start to the end of the imports} to the JSON file given as argv[1].
With --model-class it then also imports the classes a sentiment run needs (AutoTokenizer and
BertForSequenceClassification): transformers 5's own cost of a model class, which every trainer pays.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import process_start_time, write_json  # noqa: E402

start = process_start_time()
import accelerate  # noqa: E402,F401
import datasets  # noqa: E402,F401
import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401

if "--model-class" in sys.argv[2:]:
    from transformers import AutoTokenizer, BertForSequenceClassification  # noqa: E402,F401

write_json(sys.argv[1], {"seconds": time.time() - start})
