"""DTLS 1.2 for the CoAP servers: a small engine interface, its Mbed TLS implementation, an aiocoap transport."""
