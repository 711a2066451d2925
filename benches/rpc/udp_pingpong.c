/* The floor: raw UDP ping-pong on loopback, one datagram in flight.
 *   udp_pingpong server PORT
 *   udp_pingpong client PORT SIZE WARMUP DURATION SERVER_PID
 * Both sides block in recv (they sleep, they never spin). */
#include "common.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>

int main(int argc, char **argv) {
  if (argc < 3) { fprintf(stderr, "usage: udp_pingpong server|client PORT ...\n"); return 2; }
  int port = atoi(argv[2]);
  int fd = socket(AF_INET, SOCK_DGRAM, 0);
  struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
  inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  char buf[65536];
  if (strcmp(argv[1], "server") == 0) {
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 1; }
    printf("ready\n"); fflush(stdout);
    for (;;) {
      struct sockaddr_in from; socklen_t fl = sizeof from;
      ssize_t n = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&from, &fl);
      if (n < 0) continue;
      sendto(fd, buf, n, 0, (struct sockaddr *)&from, fl);
    }
  }
  if (argc < 7) { fprintf(stderr, "usage: udp_pingpong client PORT SIZE WARMUP DURATION SERVER_PID\n"); return 2; }
  int size = atoi(argv[3]);
  double warmup = atof(argv[4]), duration = atof(argv[5]);
  long spid = atol(argv[6]);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) { perror("connect"); return 1; }
  struct timeval tv = { .tv_sec = 1 }; /* a lost datagram must not hang the run */
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  char msg[65536];
  memset(msg, 'x', size);
  double t0 = now_s(), start = t0 + warmup, end = start + duration, c0 = 0, s0 = 0, m0 = 0;
  long calls = 0, lost = 0;
  int measuring = 0;
  for (;;) {
    double t = now_s();
    if (!measuring && t >= start) { measuring = 1; c0 = cpu_s(0); s0 = cpu_s(spid); m0 = machine_busy_s(); t0 = t; }
    if (t >= end) break;
    send(fd, msg, size, 0);
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n != size) { lost++; continue; }
    if (measuring) { sample(now_s() - t); calls++; }
  }
  double el = now_s() - t0;
  if (lost) printf("udp: %ld lost/timeouts\n", lost);
  report("udp", calls, el, (cpu_s(0) - c0) / el * 100, (cpu_s(spid) - s0) / el * 100,
         (machine_busy_s() - m0 - (cpu_s(0) - c0) - (cpu_s(spid) - s0)) / el * 100);
  return 0;
}
