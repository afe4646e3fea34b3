"""Hand-off to the review tools people already use: FiftyOne (:mod:`.fiftyone`) and Label Studio
(:mod:`.labelstudio`). Each module writes an audit's rows in the tool's own format and reads the
reviewer's decisions back as a reviews table (:mod:`labelsieve.audit.decisions`), so ``labelsieve apply``
reads them by the same rule as the spreadsheet's ``review`` column.

The tools are optional extras (``pip install 'labelsieve[fiftyone]'`` / ``'labelsieve[labelstudio]'``),
imported only inside the function that needs them (``import fiftyone`` alone takes about 5 s).
"""
