from .temperature_hook import DynamicTemperatureHook

__all__ = ['DynamicTemperatureHook']
