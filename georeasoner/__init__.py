"""GeoReasoner on Ray: street-view geolocation with reasoning, at cluster scale."""

__version__ = "0.1.0"
