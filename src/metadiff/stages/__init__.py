"""One LightningModule (+ DataModule) per stage."""
