"""Training procedures (layer 3): the pair-trainer scaffold (``trainer``) and the LRM's step (``lrm``)."""
