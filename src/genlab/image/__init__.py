"""Images as tokens (issue 10): training and evaluating the image tokenizer (`codecs/image.py`)
on a folder of images (`data/images.py`), and the `genlab image` commands."""
