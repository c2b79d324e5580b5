"""streamcrawl: a Kafka-native web-crawl pipeline."""

__version__ = "0.1.0"
