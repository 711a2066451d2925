/* ENet peer (Debian libenet-dev, reliable channel 0).
 *   enet_echo server PORT
 *   enet_echo client PORT SIZE WARMUP DURATION SERVER_PID [INFLIGHT]
 * The server echoes every packet back reliably and flushes at once. The client keeps INFLIGHT
 * (default 1) messages outstanding; each reply is timed from its send (the first 8 bytes of the
 * payload carry a slot index). Both sides wait in enet_host_service (they sleep, never spin). */
#include "common.h"
#include <enet/enet.h>

int main(int argc, char **argv) {
  if (argc < 3) { fprintf(stderr, "usage: enet_echo server|client PORT ...\n"); return 2; }
  if (enet_initialize() != 0) { fprintf(stderr, "enet_initialize failed\n"); return 1; }
  ENetAddress addr;
  enet_address_set_host_ip(&addr, "127.0.0.1");
  addr.port = (enet_uint16)atoi(argv[2]);
  ENetEvent ev;
  if (strcmp(argv[1], "server") == 0) {
    ENetHost *h = enet_host_create(&addr, 64, 1, 0, 0);
    if (!h) { fprintf(stderr, "enet_host_create failed\n"); return 1; }
    printf("ready\n"); fflush(stdout);
    for (;;) {
      int r = enet_host_service(h, &ev, 100);
      while (r > 0) {
        if (ev.type == ENET_EVENT_TYPE_RECEIVE) {
          ENetPacket *p = enet_packet_create(ev.packet->data, ev.packet->dataLength, ENET_PACKET_FLAG_RELIABLE);
          enet_peer_send(ev.peer, 0, p);
          enet_packet_destroy(ev.packet);
        }
        r = enet_host_check_events(h, &ev);
      }
      enet_host_flush(h);
    }
  }
  if (argc < 7) { fprintf(stderr, "usage: enet_echo client PORT SIZE WARMUP DURATION SERVER_PID [INFLIGHT]\n"); return 2; }
  int size = atoi(argv[3]);
  double warmup = atof(argv[4]), duration = atof(argv[5]);
  long spid = atol(argv[6]);
  int inflight = argc > 7 ? atoi(argv[7]) : 1;
  if (size < 8) size = 8;
  ENetHost *h = enet_host_create(NULL, 1, 1, 0, 0);
  ENetPeer *peer = enet_host_connect(h, &addr, 1, 0);
  double deadline = now_s() + 5;
  int connected = 0;
  while (!connected && now_s() < deadline)
    if (enet_host_service(h, &ev, 100) > 0 && ev.type == ENET_EVENT_TYPE_CONNECT) connected = 1;
  if (!connected) { fprintf(stderr, "enet: connect failed\n"); return 1; }
  double *sent = calloc(inflight, sizeof(double));
  unsigned char *msg = malloc(size);
  memset(msg, 'x', size);
  for (int i = 0; i < inflight; i++) {
    memcpy(msg, &i, sizeof i);
    sent[i] = now_s();
    enet_peer_send(peer, 0, enet_packet_create(msg, size, ENET_PACKET_FLAG_RELIABLE));
  }
  enet_host_flush(h);
  double t0 = now_s(), start = t0 + warmup, end = start + duration, c0 = 0, s0 = 0, m0 = 0;
  long calls = 0;
  int measuring = 0;
  for (;;) {
    double t = now_s();
    if (!measuring && t >= start) { measuring = 1; c0 = cpu_s(0); s0 = cpu_s(spid); m0 = machine_busy_s(); t0 = t; nsamples = 0; }
    if (t >= end) break;
    int r = enet_host_service(h, &ev, 100);
    while (r > 0) {
      if (ev.type == ENET_EVENT_TYPE_RECEIVE) {
        int i;
        memcpy(&i, ev.packet->data, sizeof i);
        double tr = now_s();
        if (measuring && i >= 0 && i < inflight) { sample(tr - sent[i]); calls++; }
        enet_packet_destroy(ev.packet);
        if (i >= 0 && i < inflight) {
          memcpy(msg, &i, sizeof i);
          sent[i] = tr;
          enet_peer_send(peer, 0, enet_packet_create(msg, size, ENET_PACKET_FLAG_RELIABLE));
        }
      } else if (ev.type == ENET_EVENT_TYPE_DISCONNECT) {
        fprintf(stderr, "enet: disconnected\n");
        return 1;
      }
      r = enet_host_check_events(h, &ev);
    }
    enet_host_flush(h);
  }
  double el = now_s() - t0;
  report(inflight > 1 ? "enet-pipelined" : "enet", calls, el, (cpu_s(0) - c0) / el * 100, (cpu_s(spid) - s0) / el * 100,
         (machine_busy_s() - m0 - (cpu_s(0) - c0) - (cpu_s(spid) - s0)) / el * 100);
  return 0;
}
