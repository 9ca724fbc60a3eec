condiff sample: error: no model at r7: the path does not exist
