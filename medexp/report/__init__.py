"""`medexp report` (Fig. 3 and Table 1 analogues from MLflow) and the plots every run logs."""
