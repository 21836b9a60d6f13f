// Compiled with `tsc --strict --noEmit` (see tsconfig.json here): the
// declarations in broker.d.ts must describe the API as the docs use it.
// Nothing here runs.

import {
  BrokerClient,
  BrokerError,
  ConnectionClosedError,
  ERROR_CODES,
  RequestTimeoutError,
  connect,
  matches,
  type ClientOptions,
  type ErrorCode,
  type Gap,
  type GetToken,
  type Message,
  type Position,
  type PublishAck,
  type RecoveryEvent,
  type Subscription,
} from "../broker.js";

interface Reading {
  value: number;
  unit: string;
}

export async function usage(): Promise<void> {
  const getToken: GetToken = async ({ reason }) => {
    const response = await fetch(`/token?why=${reason}`);
    return response.ok ? response.text() : null;
  };
  const options: ClientOptions = { getToken, restartDelay: 500, pingInterval: 0 };
  const client: BrokerClient = connect("wss://broker.example/ws", options);
  connect(undefined, { getToken: () => sessionStorage.getItem("token") });
  connect("ws://localhost:8000/ws", { getToken: () => "a.b.c" });

  const sub: Subscription<Reading> = client.subscribe<Reading>(
    "sensors.kitchen",
    (message: Message<Reading>) => {
      const value: number = message.data.value;
      const offset: number | undefined = message.offset;
      const epoch: string | undefined = message.epoch;
      console.log(value, offset, epoch);
    },
    {
      history: 30,
      onGap: (gap: Gap) => {
        const channel: string = gap.channel;
        const since: number | null = gap.since;
        if (gap.reason === "epoch_changed" || gap.reason === "backplane_interrupted") console.log(channel, since);
      },
      onError: (error: BrokerError) => console.log(error.code === "forbidden"),
    },
  );
  await sub.ready;
  const saved: Position | null = client.position("sensors.kitchen");
  if (saved) client.subscribe("sensors.office", () => {}, { since: saved });
  client.subscribe(["a.*", "b.>"], (m) => console.log(m.channel));

  const ack: PublishAck = await client.publish("sensors.kitchen", { t: 1 }, { key: "k1", timeout: 500 });
  const duplicate: boolean = ack.duplicate;
  const at: number | undefined = ack.offset;
  console.log(duplicate, at);

  const off = client.on("recovery", (event: RecoveryEvent) => {
    if (!event.recovered) console.log(event.reason, event.since.offset);
  });
  off();
  client.on("auth", ({ sub: user, expiresIn, refresh }) => console.log(user, expiresIn, refresh));
  client.on("gap", ({ reason, channel }) => console.log(reason, channel));
  client.on("reconnect", ({ attempts, since, until }) => console.log(attempts, until - since));
  client.on("close", ({ code, willReconnect, delay }) => console.log(code, willReconnect, delay));
  client.on("error", (error) => {
    if (error.code === "unauthorized" || error.code === "token_unavailable") console.log(error.message);
  });
  const subject: string | null = client.subject;
  console.log(subject, client.state, client.connected, client.reconnects, client.options.restartDelay);

  try {
    await client.whenConnected();
    const rtt: number = await client.ping({ timeout: 1000 });
    console.log(rtt, client.publishNoWait("clicks", { at: Date.now() }));
  } catch (error) {
    if (error instanceof ConnectionClosedError) console.log(error.closeCode, error.closeReason);
    else if (error instanceof RequestTimeoutError) console.log(error.code);
  }
  const codes: readonly ErrorCode[] = ERROR_CODES;
  console.log(codes, matches("a.*", "a.b"));
  client.close();
}

// Mistakes the declarations must catch.
export function mistakes(client: BrokerClient): void {
  // @ts-expect-error: a key is a string
  void client.publish("c", 1, { key: 42 });
  // @ts-expect-error: since is a position
  client.subscribe("c", () => {}, { since: 3 });
  // @ts-expect-error: getToken is a function
  connect("ws://x/ws", { getToken: "token" });
  // @ts-expect-error: no such event
  client.on("message", () => {});
}
