"""
The machinery: what makes a run safe, fast and observable, kept beside the four files a learner reads
(model.py, data.py, train.py, generate.py). One module per concern, each readable in one sitting; they
import one another and the small shared helpers (cli, faults), never the core files or the programs.
"""
